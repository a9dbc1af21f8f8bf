"""`make demo` runs `finetune_lora.py` with no arguments: the embedded demo, here shortened to a few steps."""

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
    assert "purple colour accuracy" in out and "training" in out
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").exists()
    for when in ("before", "after"):
        assert result[when]["purple"].n == 3 and result[when]["base"].n == 12
        assert 0.0 <= result[when]["purple"].colour <= 1.0
    assert (demo.PURPLE_DIR / "metadata.jsonl").read_text().count("a purple") == 60
