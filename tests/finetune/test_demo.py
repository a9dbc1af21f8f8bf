"""`make demo` runs `finetune_lora.py` with no arguments: the embedded demo, here shortened to a few steps."""

import json

import yaml

from finetune import demo
from finetune.config import REPO_ROOT


def test_demo_runs_the_main_job_on_the_embedded_default(tmp_path, capsys):
    values = yaml.safe_load((REPO_ROOT / "configs" / "demo_lora.yaml").read_text())
    values.update(max_train_steps=3, report_to="none", validation_prompt=None)
    short = tmp_path / "demo.yaml"
    short.write_text(yaml.safe_dump(values))
    result = demo.run_demo(short, seeds=1, output_dir=str(tmp_path / "out"))
    out = capsys.readouterr().out
    assert "purple colour accuracy" in out and "training" in out and "bar (" in out
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
    for when in ("before", "after"):
        assert result[when]["purple"].n == 3 and result[when]["base"].n == 12
        assert 0.0 <= result[when]["purple"].colour <= 1.0
    assert result["before"]["purple"].colour <= demo.PURPLE_BEFORE_MAX  # the base has never seen purple

    def captions(key):
        lines = (REPO_ROOT / values[key] / "metadata.jsonl").read_text().splitlines()
        return [json.loads(line)["text"] for line in lines]

    purple, reg = captions("train_data_dir"), captions("class_data_dir")
    assert len(purple) == 3 * demo.PURPLE_PER_SHAPE and all(c.startswith("a purple ") for c in purple)
    assert len(reg) == 12 * demo.REG_PER_CLASS and not any("purple" in c for c in reg)
