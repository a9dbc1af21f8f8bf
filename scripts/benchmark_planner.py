"""The memory planner against measurements: its prediction of a training step beside the same step measured.

Each row is a real-width, reduced-depth model (Flux.1-dev's transformer with a few of its blocks, SDXL's UNet with
fewer transformer layers) or one of the shipped tiny bases, at a resolution, precision and gradient-checkpointing
setting. The planner traces the step for a CPU device (`finetune.plan_trace.trace_run(..., "cpu")`: the CPU's
autocast policy and attention kernel, no CUDA margins). The measurement runs the same step (the same `build_run`
and `train_step`, on the CPU with random weights and torch's real autocast) in a fresh process, two ways:

- peak resident memory (VmHWM, reset after the models are built) above the resident memory at that point; glibc
  returns every block of 64 KiB or more to the system when it is freed (`MALLOC_MMAP_THRESHOLD_`), so the resident
  size follows the live tensors, plus what torch's kernels allocate outside its allocator;
- the peak of the bytes torch's CPU allocator holds, from the allocations and frees it reports to the profiler.

Both count what the step adds to the built models: optimizer state, gradients, activations, temporaries. Latents
and text embeddings are cached, so the shaped rows' text encoders and VAE are narrow stand-ins.

    python -m difftune.scripts.benchmark_planner             # every row: about an hour on 2 shared cores
    python -m difftune.scripts.benchmark_planner --rows 0 3  # some of them

Run it alone: two measurements at once do not fit in 24 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30
# Cached latents and text: only the shapes of the encoders' outputs matter, so they are narrow (T5's and CLIP's
# output widths are kept: the transformer reads them).
NARROW = dict(
    text=dict(num_hidden_layers=1, intermediate_size=64, vocab_size=1000, bos_token_id=998, eos_token_id=999,
              pad_token_id=999),
    t5=dict(num_layers=1, d_ff=64, num_heads=1, vocab_size=100),
    vae=dict(block_out_channels=(8, 8, 8, 8), norm_num_groups=8, layers_per_block=1),
)  # fmt: skip
FLUX_6 = dict(transformer=dict(num_layers=2, num_single_layers=4))  # Flux.1-dev's width, 2 double + 4 single blocks
FLUX_2 = dict(transformer=dict(num_layers=1, num_single_layers=1))
SDXL_5 = dict(unet=dict(transformer_layers_per_block=(1, 2, 2)))  # SDXL's UNet, 2 of 10 transformer layers deep
# (label, family, overrides, task, settings)
ROWS: list[tuple[str, str, dict, str, dict]] = [
    ("Flux 2+4 blocks, 512 px, bf16", "flux", FLUX_6, "lora", dict(resolution=512, mixed_precision="bf16")),
    ("Flux 2+4 blocks, 512 px, fp32", "flux", FLUX_6, "lora", dict(resolution=512)),
    ("Flux 2+4 blocks, 512 px, bf16, batch 2", "flux", FLUX_6, "lora",
     dict(resolution=512, mixed_precision="bf16", train_batch_size=2)),
    ("Flux 2+4 blocks, 1024 px, bf16", "flux", FLUX_6, "lora", dict(resolution=1024, mixed_precision="bf16")),
    ("Flux 2+4 blocks, 1024 px, bf16, checkpointing", "flux", FLUX_6, "lora",
     dict(resolution=1024, mixed_precision="bf16", gradient_checkpointing=True)),
    ("Flux 2+4 blocks, 1024 px, fp32, checkpointing", "flux", FLUX_6, "lora",
     dict(resolution=1024, gradient_checkpointing=True)),
    ("SDXL UNet (2-deep), 512 px, fp32", "sdxl", SDXL_5, "lora", dict(resolution=512)),
    ("SDXL UNet (2-deep), 512 px, bf16, batch 2", "sdxl", SDXL_5, "lora",
     dict(resolution=512, mixed_precision="bf16", train_batch_size=2)),
    ("SDXL UNet (2-deep), 512 px, fp32, checkpointing", "sdxl", SDXL_5, "lora",
     dict(resolution=512, gradient_checkpointing=True)),
    ("Flux 1+1 blocks, full fine-tuning, 512 px, bf16", "flux", FLUX_2, "full",
     dict(resolution=512, mixed_precision="bf16")),
    ("embedded tiny_shapes, 64 px, batch 8", "tiny_shapes", {}, "lora", dict(resolution=64, train_batch_size=8)),
    ("embedded tiny_shapes, 64 px, batch 8, not cached", "tiny_shapes", {}, "lora",
     dict(resolution=64, train_batch_size=8, cache_latents=False)),
    ("embedded tiny_shapes, full fine-tuning, 64 px, batch 8", "tiny_shapes", {}, "full",
     dict(resolution=64, train_batch_size=8)),
    ("embedded tiny_flow_shapes, 64 px, batch 8", "tiny_flow_shapes", {}, "lora",
     dict(resolution=64, train_batch_size=8)),
]  # fmt: skip


def config(row: int, work: Path):
    from difftune.core.config import compose
    from difftune.core.paths import embedded_base
    from difftune.finetune.tasks import task_named
    from difftune.scripts.shaped_models import write_shaped_configs

    _, kind, overrides, task_name, settings = ROWS[row]
    if kind.startswith("tiny"):  # the shipped embedded bases: the planner reads their config files
        folder = embedded_base(kind)
    else:
        folder = write_shaped_configs(kind, work / f"row{row}", {**NARROW, **overrides})
    task = task_named(task_name)
    return compose(task.config_class, dict(pretrained_model_name_or_path=str(folder), **settings)), task


def predict(row: int, work: Path) -> tuple[int, float]:
    """The planner's figure for `row`: the step's traced peak above what is alive before it; and its seconds."""
    from difftune.finetune.plan_trace import trace_run

    cfg, task = config(row, work)
    start = time.perf_counter()
    trace = trace_run(cfg, task, "cpu", detail=False)
    return trace.phases["training step"].total - trace.before_step, time.perf_counter() - start


def _status(key: str) -> int:
    """`key` (VmRSS, VmHWM) of this process, in bytes."""
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def measure_here(row: int, work: Path) -> dict:
    """Builds `row`'s run on the CPU, then measures its first two optimizer steps' peak resident memory above the
    resident memory after the build (run in a fresh process: `measure`)."""
    import gc

    import torch

    from difftune.finetune.plan_trace import build_run, init_optimizer_state, train_step

    cfg, task = config(row, work)
    torch.manual_seed(0)
    shipped = ROWS[row][1].startswith("tiny")  # the embedded bases measured with their own weights, as they train
    run = build_run(cfg, task, "cpu", lambda dtype: torch.autocast("cpu", dtype=dtype), "cpu", weights=shipped)
    gc.collect()
    baseline = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        init_optimizer_state(run)
        train_step(run)
    seconds = time.perf_counter() - start
    return {"baseline": baseline, "peak": _status("VmHWM"), "allocated": allocator_peak(prof), "seconds": seconds}


def allocator_peak(prof) -> int:
    """The peak of the bytes torch's CPU allocator held beyond what it held when profiling started: the running
    sum of its allocations and frees, as it reports them to the profiler."""
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    total = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        total += event.nbytes()
        peak = max(peak, total)
    return peak


def measure(row: int, work: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    cmd = [sys.executable, "-m", "difftune.scripts.benchmark_planner", "--measure", str(row), "--work", str(work)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=list(range(len(ROWS))))
    parser.add_argument("--measure", type=int, help=argparse.SUPPRESS)  # the fresh process of one measurement
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.measure is not None:
        print(json.dumps(measure_here(args.measure, args.work)))
        return
    print("| run (LoRA unless said) | predicted | peak RSS | error | torch's CPU allocator | error | plan (s) | "
          "step (s) |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for row in args.rows:
            predicted, plan_seconds = predict(row, work)
            m = measure(row, work)
            rss, allocated = m["peak"] - m["baseline"], m["allocated"]
            print(f"| {ROWS[row][0]} | {_size(predicted)} | {_size(rss)} | {(predicted - rss) / rss:+.1%} | "
                  f"{_size(allocated)} | {(predicted - allocated) / allocated:+.1%} | {plan_seconds:.1f} | "
                  f"{m['seconds']:.0f} |", flush=True)  # fmt: skip


def _size(nbytes: int) -> str:
    return f"{nbytes / GIB:.2f} GiB" if nbytes >= GIB / 10 else f"{nbytes / 2**20:.1f} MiB"


if __name__ == "__main__":
    main()
