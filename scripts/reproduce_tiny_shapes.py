"""Reproduces the embedded base `pipelines/tiny_shapes` from nothing: data, VAE, UNet, evaluation.

1. writes the base shapes set (red, green, blue, yellow; purple is held back) as an imagefolder;
2. trains the tiny VAE (`scripts/train_tiny_vae.py`), unless `--vae` names one;
3. assembles a fresh pipeline: random UNet and text encoder, the project's tokenizer (which knows `purple`);
4. trains the UNet with `finetune_full.py`'s task and `configs/tiny_shapes_base.yaml` (EMA, caption dropout);
5. measures colour and shape accuracy (`toyworld.evaluate`) and, with `--install`, copies the pipeline into
   `pipelines/tiny_shapes` (weights, configs and tokenizer only).

    python scripts/reproduce_tiny_shapes.py --work_dir runs/tiny_shapes [--vae DIR] [--install]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from finetune.config import REPO_ROOT, TrainConfig, parse_config, validate
from finetune.finetune_full import FULL
from finetune.loop import train
from toyworld import shapes
from toyworld.evaluate import shapes_accuracy
from toyworld.tiny import build_pipeline

PIPELINE_PARTS = ("model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="runs/tiny_shapes")
    parser.add_argument("--vae", default=None, help="a trained tiny VAE folder; trained here when absent")
    parser.add_argument("--per_class", type=int, default=200, help="images per colour x shape")
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "tiny_shapes_base.yaml"))
    parser.add_argument("--max_train_steps", type=int, default=None)
    parser.add_argument("--seeds", type=int, default=4, help="evaluation seeds per prompt")
    parser.add_argument("--install", action="store_true", help="copy the result into pipelines/tiny_shapes")
    parser.add_argument("--size", default="base", help="tiny component size (`test` for a smoke run)")
    parser.add_argument("--vae_steps", type=int, default=1000, help="VAE training steps")
    args = parser.parse_args()
    work = Path(args.work_dir)
    start = time.time()

    data = work / "data"
    if not (data / "metadata.jsonl").exists():
        shapes.write_dataset(data, shapes.BASE_COLOURS, shapes.SHAPES, per_class=args.per_class, seed=0)
    vae_dir = Path(args.vae) if args.vae else work / "vae"
    if not (vae_dir / "config.json").exists():
        vae_cmd = [sys.executable, str(REPO_ROOT / "scripts" / "train_tiny_vae.py"), "--output_dir", str(vae_dir),
                   "--steps", str(args.vae_steps), "--batch_size", "16", "--size", args.size]  # fmt: skip
        subprocess.run(vae_cmd, check=True)

    init = work / "init"
    pipe = build_pipeline(args.size, "sd1", tokenizer_dir=init / "tokenizer", seed=0)
    pipe.vae = AutoencoderKL.from_pretrained(vae_dir)
    pipe.register_modules(vae=pipe.vae)
    pipe.save_pretrained(init)

    overrides = ["--pretrained_model_name_or_path", str(init), "--train_data_dir", str(data),
                 "--output_dir", str(work / "base"), "--config", args.config]  # fmt: skip
    if args.max_train_steps:
        overrides += ["--max_train_steps", str(args.max_train_steps)]
    cfg: TrainConfig = parse_config(overrides)
    validate(cfg)
    result = train(cfg, FULL)
    print(f"UNet: {result.global_step} steps in {result.seconds:.0f}s")

    base = StableDiffusionPipeline.from_pretrained(work / "base", safety_checker=None)
    torch.manual_seed(0)
    acc, _ = shapes_accuracy(base, shapes.prompts(), seeds=args.seeds)
    print(f"tiny_shapes: {acc} (12 prompts x {args.seeds} seeds, DPM-Solver++ 20 steps, guidance 7.5)")
    if args.install:
        target = REPO_ROOT / "pipelines" / "tiny_shapes"
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for part in PIPELINE_PARTS:
            src = work / "base" / part
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, target / part)
        for name in ("vocab.json", "merges.txt"):  # transformers 4.x's slow CLIPTokenizer reads these
            shutil.copy2(init / "tokenizer" / name, target / "tokenizer" / name)
        print(f"installed in {target}")
    print(f"total {time.time() - start:.0f}s")


if __name__ == "__main__":
    main()
