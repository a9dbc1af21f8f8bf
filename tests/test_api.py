"""The Python API: `difftune.train_lora` / `train_full` take the flags' settings as keywords, checked as the command
line checks them, and `load_config` composes shipped presets by name with settings."""

from __future__ import annotations

import math

import pytest

import difftune
from difftune.core.errors import UserError


def test_train_lora_runs_with_the_flags_as_keywords(tiny_sd1, shapes_dir, tmp_path):
    result = difftune.train_lora(
        pretrained_model_name_or_path=str(tiny_sd1), train_data_dir=str(shapes_dir), output_dir=str(tmp_path / "out"),
        resolution=32, max_train_steps=2, report_to="none", rank=2,
    )  # fmt: skip
    assert result.global_step == 2 and all(math.isfinite(x) for x in result.losses)
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


def test_settings_are_checked_like_flags(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'learning_rte'; did you mean 'learning_rate'"):
        difftune.train_lora(pretrained_model_name_or_path="m", train_data_dir="d", learning_rte=1e-4)
    with pytest.raises(UserError, match="--rank must be at least 1"):
        difftune.load_config("lora", pretrained_model_name_or_path="m", train_data_dir="d", rank=0)


def test_load_config_finds_shipped_presets_by_name():
    cfg = difftune.load_config("full", "cpu", pretrained_model_name_or_path="m", train_data_dir="d", seed=7)
    assert cfg.training.seed == 7 and cfg.training.mixed_precision == "no"
