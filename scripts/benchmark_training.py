"""Seconds per training step and peak memory of LoRA training, with the latent/text cache on and off.

Each setting runs in its own process (so peak memory is its own): the embedded demo's model and data by default,
or any `--config` preset layered on top. On CPU, peak memory is the process's peak resident set size; on CUDA,
`torch.cuda.max_memory_allocated`.

    python scripts/benchmark_training.py [--steps 30] [--preset configs/hardware/cpu.yaml ...] [--output FILE.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(settings: dict) -> dict:
    """Runs one training in this process and returns its measurements."""
    import torch

    from finetune.config import TrainConfig, load_yaml, validate
    from finetune.demo import PURPLE_DIR, run_demo  # noqa: F401  (PURPLE_DIR: the demo's data)
    from finetune.finetune_lora import DEMO_CONFIG, LORA
    from finetune.loop import train
    from pipelines import shapes

    values = load_yaml(DEMO_CONFIG)
    for preset in settings.get("presets", []):
        values.update(load_yaml(preset))
    if not (PURPLE_DIR / "metadata.jsonl").exists():
        shapes.write_dataset(PURPLE_DIR, (shapes.HELD_OUT_COLOUR,), shapes.SHAPES, per_class=20, seed=1)
    values.update(
        pretrained_model_name_or_path=str(ROOT / values["pretrained_model_name_or_path"]),
        train_data_dir=str(PURPLE_DIR),
        output_dir=settings["output_dir"],
        cache_dir=settings["output_dir"] + "/cache",
        max_train_steps=settings["steps"],
        cache_latents=settings["cache"],
        validation_prompt=None,
        report_to="none",
        checkpointing_steps=10**9,
    )
    cfg = TrainConfig(**values)
    validate(cfg)
    start = time.time()
    result = train(cfg, LORA)
    total = time.time() - start
    on_cuda = torch.cuda.is_available()
    peak = torch.cuda.max_memory_allocated() if on_cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "cache": settings["cache"],
        "presets": settings.get("presets", []),
        "steps": result.global_step,
        "seconds_per_step": result.seconds / result.global_step,
        "setup_seconds": total - result.seconds,
        "peak_memory_mb": peak / 2**20,
        "memory_kind": "cuda max_memory_allocated" if on_cuda else "process peak RSS",
        "batch_size": cfg.train_batch_size,
        "resolution": cfg.resolution,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--preset", action="append", default=[], help="hardware preset YAML(s) to layer on")
    parser.add_argument("--output", default=None, help="also write the rows as JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(json.loads(args.child))))
        return

    import torch

    rows = []
    for cache in (True, False):
        with tempfile.TemporaryDirectory() as tmp:
            settings = {"cache": cache, "steps": args.steps, "output_dir": tmp, "presets": args.preset}
            proc = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(settings)], capture_output=True, text=True
            )
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"benchmark run failed (cache={cache}):\n{proc.stderr[-3000:]}")
            rows.append(json.loads(line[len("RESULT ") :]))
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({platform.processor() or 'x86_64'})"
    print(f"LoRA training on the embedded default, {args.steps} steps, device: {device}, torch threads: "
          f"{torch.get_num_threads()}")  # fmt: skip
    print("| latent/text cache | s/step | setup s | peak memory MB |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {'on' if r['cache'] else 'off'} | {r['seconds_per_step']:.3f} | {r['setup_seconds']:.1f} | "
              f"{r['peak_memory_mb']:.0f} ({r['memory_kind']}) |")  # fmt: skip
    if args.output:
        Path(args.output).write_text(json.dumps({"device": device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
