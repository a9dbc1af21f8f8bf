"""Two CPU processes (gloo) under `accelerate launch` train the same LoRA as one process with twice the accumulation.

The LoRA script runs as users run it, `accelerate launch --config_file configs/accelerate/multi_cpu.yaml
--num_processes 2 finetune/finetune_lora.py ...`, with one addition: a small probe (below) runs the script as
`__main__` after recording, in each process, the sample indices of every batch and every file written under
`--output_dir`. One test covers the four promises, since each launch costs ~20 s of imports:
each process sees a different shard of each batch, only the main process writes, the result equals one
process with `--gradient_accumulation_steps 2` (same total batch; each sample's noise is seeded by its index), and
a resume under DDP continues bit-exactly (weights and the full optimizer state).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO_ROOT = Path(__file__).resolve().parents[2]
ACCELERATE_CONFIGS = REPO_ROOT / "configs" / "accelerate"

PROBE = r"""
import atexit, json, os, runpy, sys

import safetensors.torch

out_dir = os.path.abspath(sys.argv[sys.argv.index("--output_dir") + 1])
batches, writes = [], []


def record_write(path):
    path = os.path.abspath(os.fsdecode(path))
    if path.startswith(out_dir + os.sep):
        writes.append(os.path.relpath(path, out_dir))


def audit(event, args):  # Python-level opens for writing (json, README, ...)
    if event == "open" and not isinstance(args[0], int):
        mode, flags = args[1], args[2]
        writing = any(c in mode for c in "wax+") if mode else bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
        if writing:
            record_write(args[0])


sys.addaudithook(audit)
save_file = safetensors.torch.save_file  # written in Rust: no audit event, so wrap it


def recording_save_file(tensors, filename, metadata=None):
    record_write(filename)
    return save_file(tensors, filename, metadata=metadata)


safetensors.torch.save_file = recording_save_file

import difftune.finetune.loop as loop


collate = loop.collate


def recording_collate(items):
    batch = collate(items)
    batches.append(batch["index"].tolist())
    return batch


loop.collate = recording_collate


def dump():
    name = "rank%s.json" % os.environ.get("RANK", "0")
    with open(os.path.join(os.environ["DIFFTUNE_PROBE_DIR"], name), "w") as f:
        json.dump({"batches": batches, "writes": writes}, f)


atexit.register(dump)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _env(probe_dir: Path) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        ACCELERATE_USE_CPU="1",  # see configs/accelerate/multi_cpu.yaml: torchrun's processes join as MULTI_CPU/gloo
        HF_HUB_OFFLINE="1",
        DIFFTUNE_PROBE_DIR=str(probe_dir),
    )
    return env


def _train_args(base: Path, data: Path, out: Path) -> list[str]:
    # 12 images, 2 per process per step: 3 optimizer steps per epoch; 6 steps run two epochs.
    return [
        str(REPO_ROOT / "finetune" / "finetune_lora.py"),
        "--pretrained_model_name_or_path", str(base), "--train_data_dir", str(data), "--output_dir", str(out),
        "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "6", "--checkpointing_steps", "3",
        "--learning_rate", "1e-2", "--report_to", "none", "--seed", "3",
    ]  # fmt: skip


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and ".cache" not in p.parts)


def test_two_cpu_processes_shard_write_once_and_match_accumulation(tiny_sd1, shapes_dir, tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    two_dir, one_dir = tmp_path / "probe-two", tmp_path / "probe-one"
    two_dir.mkdir()
    one_dir.mkdir()
    two_out, one_out = tmp_path / "two", tmp_path / "one"
    two = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / "multi_cpu.yaml"),
         "--num_processes", "2", str(probe), *_train_args(tiny_sd1, shapes_dir, two_out)],
        env=_env(two_dir), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    one = subprocess.Popen(
        [sys.executable, str(probe), *_train_args(tiny_sd1, shapes_dir, one_out), "--gradient_accumulation_steps", "2"],
        env=_env(one_dir), cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    two_log, one_log = two.communicate(timeout=300)[0], one.communicate(timeout=300)[0]
    assert two.returncode == 0, two_log[-3000:]
    assert one.returncode == 0, one_log[-3000:]
    assert "batch 2 x 1 accumulation x 2 processes" in two_log, "the two processes did not join one group"

    rank0, rank1 = (json.loads((two_dir / f"rank{r}.json").read_text()) for r in (0, 1))
    single = json.loads((one_dir / "rank0.json").read_text())

    # (a) Different shards: per step the two processes' samples are disjoint, and each epoch covers the data once.
    assert len(rank0["batches"]) == len(rank1["batches"]) == 6
    for b0, b1 in zip(rank0["batches"], rank1["batches"], strict=True):
        assert len(b0) == len(b1) == 2 and not set(b0) & set(b1)
    for epoch in (slice(0, 3), slice(3, 6)):
        seen = [i for b in rank0["batches"][epoch] + rank1["batches"][epoch] for i in b]
        assert sorted(seen) == list(range(12))
    # ... and they are exactly the single process's two micro-batches of each step, in order.
    assert single["batches"][0::2] == rank0["batches"] and single["batches"][1::2] == rank1["batches"]

    # (b) Only the main process writes, each file once (but progress.json, rewritten every step for a watcher), and
    # the output is the same set of files as one process's. A file written atomically is recorded under its temporary
    # name (`core.files.atomic`: `.<name>.<pid>.tmp` beside it), counted here as the file itself; back-to-back writes
    # of one temporary are one atomic write (the LoRA file is saved, then tagged with its family, before the rename).
    assert rank1["writes"] == []
    written = [re.sub(r"(^|/)\.([^/]+)\.\d+\.tmp$", r"\1\2", w) for w in rank0["writes"]]
    assert written.count("progress.json") == 6
    rest = [w for w in written if w != "progress.json"]
    once = [w for i, w in enumerate(rest) if i == 0 or rest[i - 1] != w]
    assert "pytorch_lora_weights.safetensors" in once
    assert len(once) == len(set(once)), sorted(w for w in set(once) if once.count(w) > 1)
    assert _files(two_out) == _files(one_out)
    assert {"pytorch_lora_weights.safetensors", "checkpoint-3/state.json", "checkpoint-6/state.json"} <= set(
        _files(two_out)
    )

    # (c) The same LoRA as one process with twice the accumulation, and training moved it.
    two_lora = load_file(two_out / "pytorch_lora_weights.safetensors")
    one_lora = load_file(one_out / "pytorch_lora_weights.safetensors")
    assert two_lora.keys() == one_lora.keys()
    for key in one_lora:
        torch.testing.assert_close(two_lora[key], one_lora[key], atol=1e-6, rtol=1e-5, msg=key)
    up = [v for k, v in one_lora.items() if "lora_B" in k or "lora.up" in k]
    assert up and max(v.abs().max().item() for v in up) > 0  # initialised to zero

    # (d) Resumed from checkpoint-3 by two processes, the run reaches bit-identical weights and optimizer state.
    resumed_out = tmp_path / "resumed"
    resumed = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIGS / "multi_cpu.yaml"),
         "--num_processes", "2", *_train_args(tiny_sd1, shapes_dir, resumed_out),
         "--resume_from_checkpoint", str(two_out / "checkpoint-3")],
        env=_env(two_dir), cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and not (resumed_out / "checkpoint-3").exists()
    for name in ("model.safetensors", "optimizer.safetensors"):
        straight, again = (load_file(out / "checkpoint-6" / name) for out in (two_out, resumed_out))
        assert straight.keys() == again.keys() and len(straight) > 0
        assert all(torch.equal(straight[k], again[k]) for k in straight), name


@pytest.mark.parametrize(
    "name, distributed_type, launcher_flag",
    [
        ("single_gpu", "NO", None),
        ("multi_gpu_ddp", "MULTI_GPU", "multi_gpu"),
        ("fsdp", "FSDP", "use_fsdp"),
        ("deepspeed_zero2", "DEEPSPEED", "use_deepspeed"),
        ("multi_cpu", "MULTI_GPU", "multi_gpu"),  # torchrun starts the processes; see the file's comment
    ],
)
def test_accelerate_configs_are_accepted_by_accelerate_launch(name, distributed_type, launcher_flag):
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    path = ACCELERATE_CONFIGS / f"{name}.yaml"
    args = launch_command_parser().parse_args(["--config_file", str(path), "finetune/finetune_lora.py"])
    args, defaults, _ = _validate_launch_command(args)
    assert str(defaults.distributed_type).split(".")[-1] == distributed_type
    if launcher_flag:
        assert getattr(args, launcher_flag) is True and args.num_processes == 2
    else:
        assert args.num_processes == 1 and not (args.multi_gpu or args.use_fsdp or args.use_deepspeed)
    if name == "fsdp":
        assert (args.fsdp_sharding_strategy, args.fsdp_auto_wrap_policy) == ("FULL_SHARD", "SIZE_BASED_WRAP")
        assert args.fsdp_use_orig_params is True
    if name == "deepspeed_zero2":
        assert args.zero_stage == 2 and args.gradient_accumulation_steps is None  # "auto": the training config's
    if name == "multi_cpu":
        assert args.use_cpu is True
