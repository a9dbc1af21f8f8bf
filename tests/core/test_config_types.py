"""core.config's field types beyond scalars: tuple[X, ...] and Any fields, repeatable list flags, and required
fields named in one line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from difftune.core.config import check_value, option, parse
from difftune.core.errors import UserError


@dataclass
class Settings:
    output_dir: str = option("required: no default")
    channels: tuple[int, ...] = option("a tuple field", (32, 64))
    tags: list[str] = option("a repeatable list flag", [], repeatable=True)
    words: list[str] = option("a plain list flag", [])
    options: dict[str, Any] = option("values another check owns", {})


def test_tuple_fields_read_lists_from_yaml_and_flags(tmp_path):
    assert check_value([8, 16], tuple[int, ...], "c") == (8, 16)
    assert check_value(("8",), tuple[int, ...], "c") == (8,)  # command-line strings are converted
    with pytest.raises(UserError, match=r"c\[1\] must be an integer, got 'x'"):
        check_value([8, "x"], tuple[int, ...], "c")
    path = tmp_path / "s.yaml"
    path.write_text("channels: [16, 32]\n")
    assert parse(Settings, ["--config", str(path), "--output_dir", "o"]).channels == (16, 32)
    assert parse(Settings, ["--output_dir", "o", "--channels", "4", "8"]).channels == (4, 8)


def test_fixed_length_tuples_are_refused_as_a_programming_error():
    with pytest.raises(TypeError, match=r"tuple\[X, \.\.\.\]"):
        check_value([1, 2], tuple[int, int], "c")


def test_any_is_taken_as_it_is():
    assert check_value({"a": [1, "b"]}, dict[str, Any], "o") == {"a": [1, "b"]}
    assert parse(Settings, ["--output_dir", "o", "--options", "{vae: {hidden: 8}}"]).options == {"vae": {"hidden": 8}}


def test_repeatable_flags_add_up_and_plain_list_flags_keep_their_meaning():
    cfg = parse(Settings, ["--output_dir", "o", "--tags", "a", "--tags", "b", "c", "--words", "x", "--words", "y"])
    assert cfg.tags == ["a", "b", "c"]
    assert cfg.words == ["y"]  # unchanged behaviour: a repeated plain list flag replaces


def test_a_missing_required_field_is_one_user_error():
    with pytest.raises(UserError, match=r"^--output_dir is required \(see --help\)$"):
        parse(Settings, [])
