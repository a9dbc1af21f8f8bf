"""What a hostile run over every command found, one row each: the input, the exit code and the line the user reads
(the `error:` line for exit code 2; a log line for a run that goes on). The run itself is
`scripts/hostile_run.py` (docs/reliability.md); these rows keep its findings fixed, in this process through each
command's `main` under `run_main`, as the console command runs it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from difftune.baselines import compare
from difftune.baselines import train as baseline_train
from difftune.core.errors import run_main
from difftune.finetune import finetune_lora
from difftune.pipelines import generate


def run(main: Callable, argv: list[str]) -> int:
    try:
        run_main(main, argv)
    except SystemExit as exit_:
        return exit_.code
    return 0


def train(model: Path, data: Path, out: Path, *extra: str) -> tuple:
    return finetune_lora.main, [
        "--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
        "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "1", "--report_to", "none", *extra,
    ]  # fmt: skip


def pictures(folder: Path, n: int = 2) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / f"img{i}.png")
    return folder


# ----------------------------------------------------------------------------------------------- row inputs


def apple_double(sd1: Path, tmp: Path) -> tuple:
    """A folder copied from a Mac to a shared drive: `._name` resource forks beside the images."""
    folder = pictures(tmp / "data")
    for i in range(2):
        (folder / f"img{i}.txt").write_text("a red circle")
        (folder / f"._img{i}.png").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X")
    return train(sd1, folder, tmp / "o")


def null_captions(sd1: Path, tmp: Path) -> tuple:
    folder = pictures(tmp / "data")
    rows = [{"file_name": "img0.png", "text": "a red circle"}, {"file_name": "img1.png", "text": None}]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return train(sd1, folder, tmp / "o")


def zero_snr_epsilon(sd1: Path, tmp: Path) -> tuple:
    return train(sd1, pictures(tmp / "data"), tmp / "o", "--rescale_betas_zero_snr", "--instance_prompt", "a dog")


def empty_prompt_file(sd1: Path, tmp: Path) -> tuple:
    (tmp / "prompts.txt").write_text("\n  \n")
    return generate.main, ["--model", str(sd1), "--prompt", "a dog", "--prompt_file", str(tmp / "prompts.txt"),
                           "--output_dir", str(tmp / "g")]  # fmt: skip


def baseline_output_is_file(sd1: Path, tmp: Path) -> tuple:
    (tmp / "out").write_text("")
    return baseline_train.main, ["--family", "vae", "--shapes", "--n_per_class", "2", "--resolution", "8",
                                 "--max_train_steps", "1", "--output_dir", str(tmp / "out")]  # fmt: skip


def compare_output_is_file(sd1: Path, tmp: Path) -> tuple:
    (tmp / "out").write_text("")
    return compare.main, ["--families", "vae", "--seeds", "0", "--resolution", "8", "--n_per_class", "4",
                          "--budget_steps", "1", "--output_dir", str(tmp / "out")]  # fmt: skip


def flags(*extra: str) -> Callable:
    def row(sd1: Path, tmp: Path) -> tuple:
        return train(sd1, pictures(tmp / "data"), tmp / "o", "--instance_prompt", "a dog", *extra)

    return row


def resume_by_name(sd1: Path, tmp: Path) -> tuple:
    main, argv = train(
        sd1, pictures(tmp / "data"), tmp / "o", "--instance_prompt", "a dog", "--checkpointing_steps", "1"
    )
    assert run(main, argv) == 0
    return main, [*argv, "--max_train_steps", "2", "--resume_from_checkpoint", "checkpoint-1"]


def model_is_a_file(sd1: Path, tmp: Path) -> tuple:
    return train(sd1 / "model_index.json", pictures(tmp / "data"), tmp / "o", "--instance_prompt", "a dog")


def plan_qwen_image(sd1: Path, tmp: Path) -> tuple:
    from difftune.toyworld.tiny_families import save_family_pipeline

    model = save_family_pipeline(tmp / "qwen", "qwen_image")
    return train(model, pictures(tmp / "data"), tmp / "o", "--instance_prompt", "a dog", "--plan")


@dataclass(frozen=True)
class Row:
    name: str
    prepare: Callable  # (tiny SD 1 pipeline, tmp_path) -> (main, argv)
    code: int
    line: str  # in the `error:` line (exit code 2), or in the output and log (exit code 0)


ROWS = [
    Row("macOS ._ files beside the images", apple_double, 0, "training lora (sd1): 2 examples"),
    Row("null captions in metadata.jsonl", null_captions, 0, "1 of 2 captions in"),
    Row("zero terminal SNR on an epsilon model", zero_snr_epsilon, 2,
        "--rescale_betas_zero_snr needs v-prediction, and"),
    Row("an empty --prompt_file", empty_prompt_file, 2, "prompts.txt holds no prompt; write one prompt per line"),
    Row("a baseline --output_dir that is a file", baseline_output_is_file, 2, "out is a file; give a folder"),
    Row("a comparison --output_dir that is a file", compare_output_is_file, 2, "out is a file; give a folder"),
    Row("--bucket_reso_steps 0", flags("--enable_bucket", "--min_bucket_reso", "32", "--bucket_reso_steps", "0"), 2,
        "--bucket_reso_steps 0 must be a positive multiple of 8"),
    Row("buckets of steps wider than the resolution", flags("--enable_bucket", "--min_bucket_reso", "32",
        "--max_bucket_reso", "64"), 2, "--bucket_reso_steps 64 leave no bucket of --resolution 32's area"),
    Row("a checkpoint named as diffusers' scripts name it", resume_by_name, 0, "resumed from "),
    Row("a file as the base model", model_is_a_file, 2, "model_index.json is a file; give a diffusers pipeline folder"),
    Row("--plan on Qwen-Image (an LLM with an attention mask)", plan_qwen_image, 0, "predicted peak: "),
]  # fmt: skip


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.name)
def test_hostile_run_row(row: Row, tiny_sd1, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    main, argv = row.prepare(tiny_sd1, tmp_path)
    capsys.readouterr()
    code = run(main, argv)
    out, err = capsys.readouterr()
    assert code == row.code and "Traceback" not in err, err[-3000:]
    if code == 2:
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and row.line in lines[0], lines
        written = [p for name in ("o", "g") for p in (tmp_path / name).rglob("*") if p.is_file()]
        assert not written, written  # refused before writing anything
    else:
        assert row.line in out + err + caplog.text, (out + err + caplog.text)[-3000:]
