"""Reproduces an embedded base from nothing: data, VAE, denoiser, evaluation. `--family sd1` (default) makes
`pipelines/tiny_shapes` (a UNet); `--family sd3` makes `pipelines/tiny_flow_shapes` (an SD 3 transformer trained
with rectified flow, on the UNet base's VAE, without T5).

1. writes the base shapes set (red, green, blue, yellow; purple is held back) as an imagefolder;
2. trains the tiny VAE (`scripts/train_tiny_vae.py`), unless `--vae` names one (sd3: the UNet base's VAE, given
   the shift and scale that normalise its latents on the training images);
3. assembles a fresh pipeline: random denoiser and text encoder(s), the project's tokenizer (which knows `purple`);
4. trains the denoiser with `finetune_full.py`'s task and `configs/tiny_shapes_base.yaml` or
   `configs/tiny_flow_base.yaml` (EMA, caption dropout);
5. measures colour and shape accuracy (`toyworld.evaluate`) and, with `--install`, copies the pipeline into
   `pipelines/` (weights, configs and tokenizers only).

    python scripts/reproduce_tiny_shapes.py --work_dir runs/tiny_shapes [--vae DIR] [--install]
    python scripts/reproduce_tiny_shapes.py --family sd3 --install
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # run as a program: keep out the imports it does not use (core/startup.py)
    from difftune.core.startup import quiet_start

    quiet_start()

import torch
from diffusers import AutoencoderKL

from difftune.core.config import option, parse
from difftune.core.errors import run_main
from difftune.core.paths import embedded_base, shipped_configs
from difftune.finetune.config import FullTrainConfig
from difftune.finetune.loop import train
from difftune.finetune.tasks import FULL
from difftune.pipelines.families.sd3 import zero_t5
from difftune.pipelines.loading import load_pipeline
from difftune.toyworld import shapes
from difftune.toyworld.evaluate import shapes_accuracy
from difftune.toyworld.tiny import build_pipeline

# What each embedded base is: its family, default training config, install folder.
BASES = {
    "sd1": ("tiny_shapes_base.yaml", "tiny_shapes"),
    "sd3": ("tiny_flow_base.yaml", "tiny_flow_shapes"),
}


@dataclass
class ReproduceConfig:
    family: str = option("sd1: the UNet base (tiny_shapes); sd3: the flow base (tiny_flow_shapes).", default="sd1",
                         choices=tuple(BASES))  # fmt: skip
    work_dir: str | None = option("Where data, VAE, the initial and the trained pipeline go (default runs/<base>).",
                                  default=None)  # fmt: skip
    vae: str | None = option(
        "A trained tiny VAE folder; default: trained here for sd1, the embedded base's VAE for sd3.", default=None
    )
    per_class: int = option("Images per colour x shape.", default=200)
    base_config: str | None = option("The denoiser's training config (finetune_full.py keys).", default=None)
    max_train_steps: int | None = option("Override the config's steps (a smoke run).", default=None)
    seeds: int = option("Evaluation seeds per prompt.", default=4)
    install: bool = option("Copy the result into pipelines/<base>.", default=False)
    size: str = option("Tiny component size (`test` for a smoke run).", default="base", choices=("test", "base"))
    vae_steps: int = option("VAE training steps.", default=1000)


def init_pipeline(args: ReproduceConfig, vae_dir: Path, data: Path, init: Path) -> None:
    """A fresh pipeline of the family around the trained VAE, saved to `init`. The flow base's VAE gets the shift
    and scale that make its latents zero-mean and unit-variance on the training images (as SD 3's VAE ships)."""
    pipe = build_pipeline(args.size, args.family, tokenizer_dir=init / "tokenizer", seed=0, t5=args.family != "sd3")
    vae = AutoencoderKL.from_pretrained(vae_dir)
    if args.family == "sd3":
        redraw_unseen_word(pipe, shapes.HELD_OUT_COLOUR, seed=1)
        shift, scale = latent_statistics(vae, data)
        vae.register_to_config(shift_factor=shift, scaling_factor=scale)
    pipe.vae = vae
    pipe.register_modules(vae=vae)
    if args.family == "sd3":  # so that plain `DiffusionPipeline.from_pretrained` loads the base
        text_encoder_3, tokenizer_3 = zero_t5(pipe.transformer.config.joint_attention_dim)
        pipe.register_modules(text_encoder_3=text_encoder_3, tokenizer_3=tokenizer_3)
    pipe.save_pretrained(init)


@torch.no_grad()
def redraw_unseen_word(pipe, word: str, seed: int) -> None:
    """Draws the token-embedding row of `word` afresh in each frozen CLIP encoder (CLIP's own init: normal, std 0.02;
    one generator, text_encoder first). The flow base trained with the rows of seed 0 already drew `a purple ...`
    prompts purple in 8 of 12 images before any LoRA (the demo's bar: at most 1), so the demo taught nothing; with
    seed 1's rows, 0 of 12, the first and only draw tried. The held-out word is in no training caption and CLIP is
    causal, so the trained transformer, and everything the base does with the base prompts, is the same for any
    draw: only what the unseen word means to the untrained base changes."""
    (token,) = pipe.tokenizer(word, add_special_tokens=False).input_ids
    generator = torch.Generator().manual_seed(seed)
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        weight = encoder.get_input_embeddings().weight
        weight[token] = torch.randn(weight.shape[1], generator=generator) * 0.02


@torch.no_grad()
def latent_statistics(vae: AutoencoderKL, data: Path, limit: int = 512) -> tuple[float, float]:
    """(mean, 1 / std) of the VAE's posterior means over up to `limit` training images."""
    import numpy as np
    from PIL import Image

    files = sorted(data.glob("*.png"))[:limit]
    pixels = torch.stack([torch.from_numpy(np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)) for f in files])
    latents = vae.encode(pixels.permute(0, 3, 1, 2) / 127.5 - 1.0).latent_dist.mean  # (N, C, h, w)
    return float(latents.mean()), float(1.0 / latents.std())


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(ReproduceConfig, argv, __doc__, prog="reproduce_tiny_shapes.py")
    config_name, base_name = BASES[args.family]
    work = Path(args.work_dir or f"runs/{base_name}")
    start = time.time()

    data = work / "data"
    if not (data / "metadata.jsonl").exists():
        shapes.write_dataset(data, shapes.BASE_COLOURS, shapes.SHAPES, per_class=args.per_class, seed=0)
    vae_dir = Path(args.vae) if args.vae else work / "vae"
    if args.vae is None and args.family == "sd3" and args.size == "base":
        vae_dir = embedded_base("tiny_shapes") / "vae"  # "the existing tiny VAE": shared, not retrained
    if not (vae_dir / "config.json").exists():
        vae_cmd = [sys.executable, "-m", "difftune.scripts.train_tiny_vae", "--output_dir", str(vae_dir),
                   "--steps", str(args.vae_steps), "--batch_size", "16", "--size", args.size]  # fmt: skip
        subprocess.run(vae_cmd, check=True)
    init_pipeline(args, vae_dir, data, work / "init")

    overrides = ["--pretrained_model_name_or_path", str(work / "init"), "--train_data_dir", str(data),
                 "--output_dir", str(work / "base"),
                 "--config", args.base_config or str(shipped_configs() / config_name)]  # fmt: skip
    if args.max_train_steps:
        overrides += ["--max_train_steps", str(args.max_train_steps)]
    result = train(parse(FullTrainConfig, overrides, prog="finetune_full.py"), FULL)
    print(f"{args.family} denoiser: {result.global_step} steps in {result.seconds:.0f}s")

    base, _ = load_pipeline(str(work / "base"))
    torch.manual_seed(0)
    acc, _ = shapes_accuracy(base, shapes.prompts(), seeds=args.seeds)
    print(f"{base_name}: {acc} (12 prompts x {args.seeds} seeds, 20 steps, guidance 7.5)")
    if args.install:
        install(work, embedded_base(base_name))
    print(f"total {time.time() - start:.0f}s")


def install(work: Path, target: Path) -> None:
    """Copies the trained pipeline's parts (weights, configs, tokenizer files) into the repository."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    parts = ["model_index.json"] + [p.name for p in (work / "base").iterdir() if (p / "config.json").exists()
                                    or p.name in ("scheduler", "tokenizer", "tokenizer_2")]  # fmt: skip
    for part in sorted(set(parts)):
        src = work / "base" / part
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, target / part)
    for name in ("vocab.json", "merges.txt"):  # transformers 4.x's slow CLIPTokenizer reads these
        for tokenizer in ("tokenizer", "tokenizer_2"):
            if (target / tokenizer).is_dir() and (work / "init" / "tokenizer" / name).exists():
                shutil.copy2(work / "init" / "tokenizer" / name, target / tokenizer / name)
    halve_weights(target / "transformer")
    print(f"installed in {target}")


def halve_weights(folder: Path) -> None:
    """A transformer's weights stored in fp16 (they load as fp32): the flow base's 9 MB transformer fits the repo's
    10 MB budget for an embedded base only so. A no-op for folders without a transformer (the UNet base)."""
    from safetensors.torch import load_file, save_file

    for path in folder.glob("*.safetensors"):
        state = load_file(path)
        save_file({k: v.half() if v.is_floating_point() else v for k, v in state.items()}, path)


if __name__ == "__main__":
    run_main(main)
