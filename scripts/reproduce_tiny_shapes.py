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

import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import the project, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline

from core.config import option, parse
from core.errors import run_main
from finetune.config import REPO_ROOT, FullTrainConfig
from finetune.loop import train
from finetune.tasks import FULL
from toyworld import shapes
from toyworld.evaluate import shapes_accuracy
from toyworld.tiny import build_pipeline

PIPELINE_PARTS = ("model_index.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae")


@dataclass
class ReproduceConfig:
    work_dir: str = option("Where data, VAE, the initial and the trained pipeline go.", default="runs/tiny_shapes")
    vae: str | None = option("A trained tiny VAE folder; trained here when absent.", default=None)
    per_class: int = option("Images per colour x shape.", default=200)
    base_config: str = option(
        "The UNet's training config (finetune_full.py keys).",
        default=str(REPO_ROOT / "configs" / "tiny_shapes_base.yaml"),
    )
    max_train_steps: int | None = option("Override the config's UNet steps (a smoke run).", default=None)
    seeds: int = option("Evaluation seeds per prompt.", default=4)
    install: bool = option("Copy the result into pipelines/tiny_shapes.", default=False)
    size: str = option("Tiny component size (`test` for a smoke run).", default="base", choices=("test", "base"))
    vae_steps: int = option("VAE training steps.", default=1000)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(ReproduceConfig, argv, __doc__, prog="reproduce_tiny_shapes.py")
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
                 "--output_dir", str(work / "base"), "--config", args.base_config]  # fmt: skip
    if args.max_train_steps:
        overrides += ["--max_train_steps", str(args.max_train_steps)]
    result = train(parse(FullTrainConfig, overrides, prog="finetune_full.py"), FULL)
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
    run_main(main)
