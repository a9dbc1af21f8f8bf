"""Our LoRA entry script against diffusers' own `examples/text_to_image/train_text_to_image_lora.py`, same run.

Both train the tiny SD 1.5-layout pipeline of `benchmark_training.py --options` on its 64 images (64 px, batch 8,
rank 4 on the attention projections, lr 1e-4, seed 0, their default tracker, tensorboard, for both), offline, each
as its own process run twice, for `--short` and `--long` steps. Per process: wall time from launch to exit and
peak RSS (`os.wait4`). Per step: (long - short) wall time / (long - short) steps, which leaves start-up out; start-up
to the first step: the short run's wall time less its other steps.

diffusers' script is not part of this repository: pass a copy of it (`--diffusers_script`, e.g. from a diffusers
checkout: `git show HEAD:examples/text_to_image/train_text_to_image_lora.py > /tmp/train_text_to_image_lora.py`)
and a Python that has torchvision (`--diffusers_python`), which the script imports for its transforms. Where only
a CUDA build of torchvision exists beside a CPU torch, its detection-op registrations fail at import; the script
uses none of them, so `--skip_torchvision_ops` stubs `torchvision._meta_registrations` out (its transforms, all
the script uses, are untouched).

    python scripts/compare_diffusers_training.py --diffusers_script /tmp/train_text_to_image_lora.py \\
        --diffusers_python /tmp/dfx-venv/bin/python [--skip_torchvision_ops] [--threads 2] [--ours_options="--compile ..."]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from difftune.core.config import option, parse
from difftune.core.errors import UserError, run_main

STUB = (
    "import runpy, sys, types; sys.modules['torchvision._meta_registrations'] = "
    "types.ModuleType('torchvision._meta_registrations'); script = sys.argv[1]; sys.argv = sys.argv[1:]; "
    "runpy.run_path(script, run_name='__main__')"
)


@dataclass
class CompareConfig:
    diffusers_script: str = option("A copy of diffusers' train_text_to_image_lora.py (kept outside the repo).")
    diffusers_python: str = option("A Python with torchvision for diffusers' script.", default=sys.executable)
    skip_torchvision_ops: bool = option(
        "Stub torchvision's detection-op registrations out (see above).", default=False
    )
    ours_options: str = option('Flags of a second row of ours, one string: --ours_options="--compile ..."', default="")
    threads: int = option("OMP_NUM_THREADS of every process.", default=2)
    short: int = option("Steps of the short runs.", default=10)
    long: int = option("Steps of the long runs.", default=30)
    work_dir: str | None = option("Keep the tiny model and data here (default: a temporary folder).", default=None)


def timed(command: list[str], env: dict) -> tuple[float, float]:
    """Wall seconds and peak RSS (MB) of one process; stops with its output if it fails."""
    start = time.time()
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.time() - start
    if proc.returncode != 0:
        raise UserError(f"{' '.join(command[:3])} ... failed:\n{output[-3000:]}")
    return seconds, usage.ru_maxrss / 1024


def commands(args: CompareConfig, model: Path, data: Path, out: Path, steps: int) -> dict[str, list[str]]:
    shared = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(data), "--resolution", "64",
              "--center_crop", "--train_batch_size", "8", "--rank", "4", "--learning_rate", "1e-4", "--seed", "0",
              "--max_train_steps", str(steps), "--report_to", "tensorboard"]  # fmt: skip
    theirs = [args.diffusers_python, "-c", STUB, args.diffusers_script] if args.skip_torchvision_ops else [
        args.diffusers_python, args.diffusers_script]  # fmt: skip
    rows = {
        "difftune finetune_lora.py": [
            sys.executable,
            "-m",
            "difftune.finetune.finetune_lora",
            *shared,
            "--output_dir",
            str(out / "a"),
        ],
        "diffusers train_text_to_image_lora.py": [*theirs, *shared, "--output_dir", str(out / "b")],
    }
    if args.ours_options:
        rows[f"difftune finetune_lora.py {args.ours_options}"] = [
            sys.executable, "finetune/finetune_lora.py", *shared, *args.ours_options.split(), "--output_dir", str(out / "c")]  # fmt: skip
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(CompareConfig, argv, __doc__, prog="compare_diffusers_training.py")
    if not Path(args.diffusers_script).is_file():
        raise UserError(f"--diffusers_script {args.diffusers_script}: no such file")
    from difftune.scripts.benchmark_training import build_tiny_run

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model, data = build_tiny_run(Path(args.work_dir or tmp))
        for steps in (args.short, args.long):
            for name, command in commands(args, model, data, Path(tmp) / f"out{steps}", steps).items():
                seconds, peak = timed(command, env)
                results.setdefault(name, {})[steps] = {"seconds": seconds, "peak_rss_mb": peak}
                print(f"{name}, {steps} steps: {seconds:.1f}s, peak RSS {peak:.0f} MB", file=sys.stderr, flush=True)
    print(f"Same run, {args.threads} threads; per step from {args.short}- and {args.long}-step runs")
    print(
        f"| script | s/step | start-up to first step s | {args.long} steps incl. start-up s | peak RSS MB ({args.long} steps) |"
    )
    print("|---|---|---|---|---|")
    for name, r in results.items():
        per_step = (r[args.long]["seconds"] - r[args.short]["seconds"]) / (args.long - args.short)
        first = r[args.short]["seconds"] - (args.short - 1) * per_step
        print(
            f"| {name} | {per_step:.3f} | {first:.1f} | {r[args.long]['seconds']:.1f} | {r[args.long]['peak_rss_mb']:.0f} |"
        )
    print(json.dumps(results))


if __name__ == "__main__":
    run_main(main)
