"""`make demo` runs `difftune-demo`: the embedded demo, run here in full against its own bar.

The whole demo (on the embedded base, evaluated before and after) takes a few minutes on two cores; it is the
project's main job, so it is tested as users run it, in a temporary folder, never the repo's.
"""

import json

import pytest

from difftune.core.config import parse
from difftune.core.errors import UserError
from difftune.finetune import demo


# The flow and edit demos are held to the same bar but cost another few minutes each, which the CI budget does not
# have: `make test-slow` runs them.
@pytest.mark.parametrize(
    "name",
    [pytest.param("unet", marks=pytest.mark.long), pytest.param("flow", marks=pytest.mark.slow),
     pytest.param("edit", marks=pytest.mark.slow)],
)  # fmt: skip
def test_demo_meets_its_bar(name, tmp_path, capsys):
    result = demo.run_demo(name, tmp_path, seeds=4)
    out = capsys.readouterr().out
    assert "bar (" in out and "met" in out
    before, after = result["before"], result["after"]
    if name == "edit":  # 24 held-out inputs, edited to purple and to each base colour, x 4 seeds
        assert before["purple"].n == 96 and before["base"].n == 384
    else:
        assert before["purple"].n == 12 and before["base"].n == 48  # 3 and 12 prompts x 4 seeds
    assert after["purple"].colour >= demo.PURPLE_AFTER_MIN
    assert after["base"].colour >= demo.BASE_AFTER_MIN
    assert min(after["base"].shape, after["purple"].shape) >= demo.SHAPES_AFTER_MIN  # the adapter kept shapes
    assert before["purple"].colour <= demo.PURPLE_BEFORE_MAX  # the base has never seen purple
    assert result["met"]
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
    if name == "edit":
        rows = [
            json.loads(line) for line in (tmp_path / "data" / "edit_pairs" / "metadata.jsonl").read_text().splitlines()
        ]
        purple = [r for r in rows if r["text"] == "make it purple"]
        assert (
            len(purple) == 3 * 4 * 3 * demo.EDIT_PER_CLASS and len(rows) - len(purple) == 16 * 3 * demo.EDIT_PER_CLASS
        )
        assert not any(r["input_colour"] == "purple" for r in rows)  # purple is asked for, never given
        return

    def captions(folder):
        lines = (folder / "metadata.jsonl").read_text().splitlines()
        return [json.loads(line)["text"] for line in lines]

    data = tmp_path / "data"
    purple, reg = captions(data / "purple_80"), captions(data / "base_reg_20")
    assert len(purple) == 3 * demo.PURPLE_PER_SHAPE and all(c.startswith("a purple ") for c in purple)
    assert len(reg) == 12 * demo.REG_PER_CLASS and not any("purple" in c for c in reg)


def test_every_demo_has_a_shipped_config():
    for name in demo.DEMOS:
        assert demo.demo_config(name).is_file()


def test_unknown_demo_is_one_line():
    with pytest.raises(UserError, match="--demo sdxl: unknown"):
        parse(demo.DemoConfig, ["--demo", "sdxl"])
    with pytest.raises(UserError, match="--demo sdxl: no such demo; choose one of unet, flow, edit"):
        demo.demo_config("sdxl")


def test_demo_options_are_typed_flags():
    cfg = parse(demo.DemoConfig, ["--demo", "flow", "--seed", "1"])
    assert (cfg.demo, cfg.seed) == ("flow", 1)
