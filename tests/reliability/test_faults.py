"""Fault injection: training is killed, interrupted, starved of disk, handed damaged checkpoints, changed settings and
bad input, and each test asserts the exact promise:
- after a fault, the last complete checkpoint loads and a `--resume_from_checkpoint latest` run ends with weights
  bit-identical to an uninterrupted run's (checkpoints and the saved LoRA);
- nothing half-written stays (no `checkpoint-N.tmp`, every `checkpoint-N` complete);
- bad input and impossible resumes are one `error:` line, exit code 2, no traceback, before any model loads.

Kills are real signals sent by the process to itself at an exact point (`fault_launcher.py`). The fast part runs in
`make test`; the `faults` marker holds the long variant (many kill points, SIGINT, every save phase), run by
`make test-faults`. Everything runs with one thread so runs in and out of this process compute the same floats.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from difftune.core import checkpoint as ckpt
from difftune.core.errors import run_main
from difftune.finetune import finetune_lora, loop

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER = Path(__file__).with_name("fault_launcher.py")
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
STEPS, EVERY = 6, 2  # checkpoints 2, 4, 6


def flags(model, data, out, *extra) -> list[str]:
    return ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--output_dir", str(out),
            "--resolution", "32", "--center_crop", "--train_batch_size", "4", "--max_train_steps", str(STEPS),
            "--checkpointing_steps", str(EVERY), "--learning_rate", "1e-2", "--report_to", "none", "--seed", "5",
            *extra]  # fmt: skip


def launch(spec: str, args: list[str]) -> subprocess.CompletedProcess:
    """The LoRA script in a fresh process with a fault armed (`fault_launcher.py`)."""
    return subprocess.run([sys.executable, str(LAUNCHER), spec, "--", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)  # fmt: skip


def in_process(args: list[str]) -> int:
    """The LoRA script in this process, as `run_main` runs it; its exit code."""
    try:
        run_main(finetune_lora.main, args)
    except SystemExit as exit_:
        return exit_.code
    return 0


def cli(args: list[str], capsys) -> tuple[int, str]:
    """`in_process`, with what it printed on stderr."""
    capsys.readouterr()
    code = in_process(args)
    return code, capsys.readouterr().err


def one_error_line(code: int, err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and "Traceback" not in err and len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def reference(tiny_sd1, shapes_dir, tmp_path_factory, one_thread) -> Path:
    """An uninterrupted run (in this process: killed runs in their own process give the same floats, one thread
    each)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    assert in_process(flags(tiny_sd1, shapes_dir, out)) == 0
    return out


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path)


def assert_nothing_lost(out: Path, reference: Path) -> None:
    """No temporary folder, every checkpoint complete, and the final checkpoint and LoRA bit-identical."""
    assert not list(out.glob("*.tmp")), list(out.glob("*.tmp"))
    folders = sorted(p for p in out.glob("checkpoint-*") if p.is_dir())
    assert all(ckpt.damage(p) is None for p in folders)
    for name in (f"checkpoint-{STEPS}/model.safetensors", "pytorch_lora_weights.safetensors"):
        a, b = tensors(out / name), tensors(reference / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def resume_and_check(model, data, out: Path, reference: Path) -> None:
    assert in_process(flags(model, data, out, "--resume_from_checkpoint", "latest")) == 0
    assert_nothing_lost(out, reference)


def partial_copy(reference: Path, out: Path, keep: tuple[int, ...]) -> Path:
    """The reference run's folder as if it had stopped after its checkpoints `keep` (no result saved yet)."""
    out.mkdir(parents=True)
    for step in keep:
        shutil.copytree(reference / f"checkpoint-{step}", out / f"checkpoint-{step}")
    return out


# ----------------------------------------------------------------------------------------------- fast part


def test_sigkill_mid_save_then_resume_loses_nothing(tiny_sd1, shapes_dir, reference, tmp_path):
    out = tmp_path / "out"
    killed = launch("write:KILL:5", flags(tiny_sd1, shapes_dir, out))  # checkpoint-4's optimizer file
    assert killed.returncode == -9
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["checkpoint-2"] and (out / "checkpoint-4.tmp").is_dir()
    resume_and_check(tiny_sd1, shapes_dir, out, reference)


def test_ctrl_c_mid_training_is_one_line_and_resumes(tiny_sd1, shapes_dir, reference, tmp_path, capsys,
                                                     monkeypatch):  # fmt: skip
    """Ctrl+C as Python delivers it (KeyboardInterrupt at the 4th batch); the real SIGINT is in the long variant."""
    real_loss, calls = loop.batch_loss, []

    def ctrl_c(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(loop, "batch_loss", ctrl_c)
    out = tmp_path / "out"
    code, err = cli(flags(tiny_sd1, shapes_dir, out), capsys)
    assert code == 130 and "interrupted" in re.split(r"[\r\n]", err) and "Traceback" not in err
    monkeypatch.setattr(loop, "batch_loss", real_loss)
    resume_and_check(tiny_sd1, shapes_dir, out, reference)


def test_full_disk_while_saving_keeps_the_last_checkpoint(tiny_sd1, shapes_dir, reference, tmp_path, monkeypatch,
                                                          capsys):  # fmt: skip
    real_save, calls = ckpt.save_file, []

    def full_disk(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 4:  # checkpoint-4's weights: half a file, then the disk is full
            Path(path).write_bytes(b"\0" * 64)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", full_disk)
    out = tmp_path / "out"
    line = one_error_line(*cli(flags(tiny_sd1, shapes_dir, out), capsys))
    assert "could not write checkpoint-4" in line and "No space left on device" in line
    assert f"the last complete checkpoint is {out / 'checkpoint-2'}" in line
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]
    monkeypatch.setattr(ckpt, "save_file", real_save)
    resume_and_check(tiny_sd1, shapes_dir, out, reference)


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_damaged_latest_checkpoint_is_skipped_by_name(tiny_sd1, shapes_dir, reference, tmp_path, caplog, damage):
    caplog.set_level(logging.INFO)
    out = partial_copy(reference, tmp_path / "out", keep=(2, 4))
    target = out / "checkpoint-4" / "optimizer.safetensors"
    target.write_bytes(target.read_bytes()[:100]) if damage == "truncated" else target.unlink()
    resume_and_check(tiny_sd1, shapes_dir, out, reference)
    assert "checkpoint-4: incomplete or damaged (optimizer.safetensors" in caplog.text
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in caplog.text


def test_corrupt_file_of_the_same_size_is_skipped_by_latest_and_refused_by_name(
    tiny_sd1, shapes_dir, reference, tmp_path, capsys, caplog
):
    caplog.set_level(logging.INFO)
    out = partial_copy(reference, tmp_path / "out", keep=(2, 4))
    target = out / "checkpoint-4" / "model.safetensors"
    damaged = b"\xff" * target.stat().st_size
    target.write_bytes(damaged)
    named = flags(tiny_sd1, shapes_dir, out, "--resume_from_checkpoint", str(out / "checkpoint-4"))
    line = one_error_line(*cli(named, capsys))
    assert "checkpoint-4: incomplete or damaged (model.safetensors differs from the file saved" in line
    resume_and_check(tiny_sd1, shapes_dir, out, reference)
    assert "checkpoint-4: incomplete or damaged (model.safetensors differs" in caplog.text
    assert f"resumed from {out / 'checkpoint-2'} at step 2" in caplog.text
    assert (next(out.glob("abandoned-*")) / "checkpoint-4" / "model.safetensors").read_bytes() == damaged  # kept


def test_kill_while_caching_latents_then_resume_loses_nothing(tiny_sd1, shapes_dir, reference, tmp_path):
    """Killed after some latent cache entries were written (the text is cached first: every caption and the empty
    one): the resumed run encodes the rest and ends bit-identical."""
    from difftune.core.imagefolder import read_records

    out = tmp_path / "out"
    text_entries = len({r.caption for r in read_records(train_data_dir=str(shapes_dir))} | {""})
    killed = launch(f"cache:KILL:{text_entries + 5}", flags(tiny_sd1, shapes_dir, out))
    assert killed.returncode == -9 and len(list((out / ".cache" / "latents").glob("*.safetensors"))) == 4
    resume_and_check(tiny_sd1, shapes_dir, out, reference)
    assert not list((out / ".cache").rglob("*.tmp"))


def test_resume_applies_a_new_learning_rate(tiny_sd1, shapes_dir, reference, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    out = partial_copy(reference, tmp_path / "out", keep=(2,))
    code, err = cli(flags(tiny_sd1, shapes_dir, out, "--learning_rate", "3e-2", "--resume_from_checkpoint", "latest"),
                    capsys)  # fmt: skip
    assert code == 0, err[-3000:]
    assert "resuming with new --learning_rate 0.01 -> 0.03" in caplog.text
    (scheduler,) = json.loads((out / f"checkpoint-{STEPS}" / "state.json").read_text())["schedulers"]
    assert scheduler["base_lrs"] == [3e-2] and scheduler["_last_lr"] == [3e-2]
    card = (out / "README.md").read_text()
    assert "| learning_rate | 0.03 |" in card, card


@pytest.mark.parametrize(
    "change, words",
    [
        (["--train_batch_size", "2"], ["--train_batch_size 4 -> 2"]),
        (["--gradient_accumulation_steps", "2", "--rank", "8"], ["--gradient_accumulation_steps 1 -> 2",
                                                                 "--rank 4 -> 8"]),
        (["--seed", "6"], ["--seed 5 -> 6"]),
    ],
)  # fmt: skip
def test_resume_that_would_change_the_trajectory_is_refused_before_loading(
    tiny_sd1, shapes_dir, reference, tmp_path, capsys, monkeypatch, change, words
):
    monkeypatch.setattr(loop, "load_models", refuse_to_load)
    out = partial_copy(reference, tmp_path / "out", keep=(2,))
    line = one_error_line(
        *cli(flags(tiny_sd1, shapes_dir, out, *change, "--resume_from_checkpoint", "latest"), capsys)
    )
    assert all(w in line for w in words) and "--resume_allow_changes" in line, line


def test_resume_with_other_data_is_refused(tiny_sd1, shapes_dir, reference, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(loop, "load_models", refuse_to_load)
    data = tmp_path / "data"
    shutil.copytree(shapes_dir, data)
    (data / "metadata.jsonl").write_text((data / "metadata.jsonl").read_text().replace("a red", "a crimson", 1))
    out = partial_copy(reference, tmp_path / "out", keep=(2,))
    line = one_error_line(*cli(flags(tiny_sd1, data, out, "--resume_from_checkpoint", "latest"), capsys))
    assert "the training data (12 examples then, 12 now, contents differ)" in line


def test_allowed_batch_size_change_restarts_the_epoch(tiny_sd1, shapes_dir, reference, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO)
    out = partial_copy(reference, tmp_path / "out", keep=(2,))
    args = flags(tiny_sd1, shapes_dir, out, "--train_batch_size", "2", "--resume_from_checkpoint", "latest",
                 "--resume_allow_changes")  # fmt: skip
    code, err = cli(args, capsys)
    assert code == 0, err[-3000:]
    assert "--train_batch_size 4 -> 2" in caplog.text and "the interrupted epoch restarts" in caplog.text
    assert "at step 2 (epoch 0, batch 0 of it)" in caplog.text
    assert ckpt.damage(out / f"checkpoint-{STEPS}") is None


def refuse_to_load(*args, **kwargs):
    raise AssertionError("a model was loaded before the bad input was refused")


def bad_training_inputs(tmp_path: Path) -> list[tuple[list[str], str]]:
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    only_state = tmp_path / "only_state"
    only_state.mkdir()
    (only_state / "state.json").write_text("{}")
    junk = tmp_path / "junk_out"
    (junk / "checkpoint-99").mkdir(parents=True)
    return [
        (["--output_dir", str(a_file)], f"--output_dir {a_file} is a file"),
        (["--output_dir", "/proc/difftune_out"], "--output_dir /proc/difftune_out: cannot write into /proc"),
        (["--checkpoints_total_limit", "-1"], "--checkpoints_total_limit must be at least 1"),
        (["--checkpoints_total_limit", "0"], "--checkpoints_total_limit must be at least 1"),
        (["--num_train_epochs", "0"], "--num_train_epochs must be at least 1"),
        (["--max_train_steps", "0"], "--max_train_steps must be at least 1"),
        (["--seed", "-1"], "--seed -1 must be within [0, 2**32)"),
        (["--lr_scheduler", "foo"], "--lr_scheduler foo: unknown"),
        (["--dataloader_num_workers", "-1"], "--dataloader_num_workers must not be negative"),
        (["--lora_dropout", "5"], "--lora_dropout 5.0 must be within [0, 1)"),
        (["--resume_from_checkpoint", str(only_state)], "incomplete or damaged (no manifest.json"),
        (["--output_dir", str(junk), "--resume_from_checkpoint", str(junk / "checkpoint-99")], "no state.json"),
    ]


def test_every_bad_training_input_is_one_line_before_any_model_loads(
    tiny_sd1, shapes_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(loop, "load_models", refuse_to_load)
    for extra, words in bad_training_inputs(tmp_path):
        line = one_error_line(*cli(flags(tiny_sd1, shapes_dir, tmp_path / "out", *extra), capsys))
        assert words in line, (extra, line)


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is refused on a CPU only")
def test_fp16_on_a_cpu_is_one_line_before_any_model_loads(tiny_sd1, shapes_dir, tmp_path, capsys, monkeypatch):
    from accelerate.state import AcceleratorState

    monkeypatch.setattr(loop, "load_models", refuse_to_load)
    AcceleratorState._reset_state(reset_partial_state=True)  # accelerate fixes the precision once per process
    try:
        line = one_error_line(*cli(flags(tiny_sd1, shapes_dir, tmp_path, "--mixed_precision", "fp16"), capsys))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
    assert "--mixed_precision fp16 needs a GPU" in line and "bf16" in line


def test_unreachable_hub_stops_before_any_model_loads(tiny_sd1, shapes_dir, tmp_path, capsys, monkeypatch):
    from huggingface_hub.errors import HTTPError

    from difftune.finetune import hub

    class Unreachable:
        def create_repo(self, *args, **kwargs):
            raise HTTPError("403 Forbidden: you may not write to someone-else/x")

    monkeypatch.setattr(hub, "HfApi", Unreachable)
    monkeypatch.setattr(loop, "load_models", refuse_to_load)
    args = flags(tiny_sd1, shapes_dir, tmp_path / "out", "--push_to_hub", "--hub_token", "hf_x",
                 "--hub_model_id", "someone-else/x")  # fmt: skip
    line = one_error_line(*cli(args, capsys))
    assert "cannot create or reach the Hub repository 'someone-else/x'" in line and "nothing was trained" in line
    assert "hf_x" not in line


def test_failed_push_after_training_says_where_the_result_is(tiny_sd1, shapes_dir, reference, tmp_path, capsys,
                                                             monkeypatch):  # fmt: skip
    from huggingface_hub.errors import HTTPError

    from difftune.finetune import hub

    class FailsToUpload:
        def create_repo(self, name, **kwargs):
            return type("Repo", (), {"repo_id": f"me/{name}"})()

        def upload_folder(self, **kwargs):
            raise HTTPError("502 Bad Gateway")

    monkeypatch.setattr(hub, "HfApi", FailsToUpload)
    out = partial_copy(reference, tmp_path / "out", keep=(6,))  # nothing left to train: saves, then pushes
    args = flags(
        tiny_sd1, shapes_dir, out, "--push_to_hub", "--hub_token", "hf_x", "--resume_from_checkpoint", "latest"
    )
    line = one_error_line(*cli(args, capsys))
    assert "could not upload to 'me/out'" in line and f"the result is saved in {out}" in line
    assert f"hf upload me/out {out} . --include 'pytorch_lora_weights.safetensors'" in line
    assert (out / "pytorch_lora_weights.safetensors").is_file()


def test_a_stale_tmp_folder_is_removed_at_start(tiny_sd1, shapes_dir, reference, tmp_path, capsys, caplog):
    out = partial_copy(reference, tmp_path / "out", keep=(6,))
    (out / "checkpoint-8.tmp").mkdir()
    (out / "checkpoint-8.tmp" / "model.safetensors").write_bytes(b"half")
    code, err = cli(flags(tiny_sd1, shapes_dir, out, "--resume_from_checkpoint", "latest"), capsys)
    assert code == 0, err[-3000:]
    assert "left by an interrupted save" in caplog.text and not (out / "checkpoint-8.tmp").exists()


# ----------------------------------------------------------------------------------------------- long variant

# Every phase of every save (3 safetensors writes and the rename, at each of the 3 checkpoints), and random steps.
SAVE_POINTS = [f"write:KILL:{n}" for n in range(1, 10)] + [f"rename:KILL:{n}" for n in range(1, 4)]
STEP_POINTS = [f"step:KILL:{n}" for n in random.Random(11).sample(range(1, STEPS + 1), 4)]
SIGINT_POINTS = ["step:INT:2", "write:INT:4", "rename:INT:2"]


@pytest.mark.faults
@pytest.mark.parametrize("spec", SAVE_POINTS + STEP_POINTS + SIGINT_POINTS)
def test_fault_at_every_point_then_resume_loses_nothing(tiny_sd1, shapes_dir, reference, tmp_path, spec):
    out = tmp_path / "out"
    faulted = launch(spec, flags(tiny_sd1, shapes_dir, out))
    assert faulted.returncode == (-9 if ":KILL:" in spec else 130), faulted.stderr[-3000:]
    assert "Traceback" not in faulted.stderr
    if ":INT:" in spec:
        assert "interrupted" in re.split(r"[\r\n]", faulted.stderr)
    for folder in ckpt.list_checkpoints(out):  # every complete checkpoint loads
        assert ckpt.damage(folder) is None and tensors(folder / "model.safetensors")
    resume_and_check(tiny_sd1, shapes_dir, out, reference)


@pytest.mark.faults
def test_repeated_kills_then_resume_loses_nothing(tiny_sd1, shapes_dir, reference, tmp_path):
    """Killed again while resuming, twice, at other points: still bit-identical in the end."""
    out = tmp_path / "out"
    assert launch("write:KILL:2", flags(tiny_sd1, shapes_dir, out)).returncode == -9
    resume = flags(tiny_sd1, shapes_dir, out, "--resume_from_checkpoint", "latest")
    assert launch("step:KILL:2", resume).returncode == -9
    assert launch("rename:KILL:1", resume).returncode == -9
    resume_and_check(tiny_sd1, shapes_dir, out, reference)
