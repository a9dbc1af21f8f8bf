"""Full fine-tuning of Stable Diffusion's UNet (optionally the text encoder), saving a diffusers pipeline folder.

`accelerate launch finetune/finetune_full.py --pretrained_model_name_or_path ... --train_data_dir ...`. Shares
the training loop with `finetune_lora.py`; only what trains and how it is saved differ. With `--use_ema` the
saved UNet is the exponential moving average of the trained weights.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import the project, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from diffusers import DiffusionPipeline

from core.errors import run_main
from finetune.config import TrainConfig
from finetune.export import write_model_card
from finetune.hub import push_to_hub
from finetune.loop import Task, run_task


def setup(comps, cfg: TrainConfig) -> dict:
    comps.unet.requires_grad_(True)
    models = {"unet": comps.unet}
    if cfg.train_text_encoder:
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(comps, name)
            if encoder is not None:
                encoder.requires_grad_(True)
                models[name] = encoder
    return models


def save(comps, cfg: TrainConfig, output_dir: Path, ema) -> None:
    unet = comps.unet
    if ema is not None:
        ema.copy_to(unet.parameters())
    parts = dict(unet=unet, text_encoder=comps.text_encoder, vae=comps.vae, tokenizer=comps.tokenizer)
    if comps.family == "sdxl":
        parts.update(text_encoder_2=comps.text_encoder_2, tokenizer_2=comps.tokenizer_2)
    else:
        parts.update(safety_checker=None, requires_safety_checker=False)
    pipe = DiffusionPipeline.from_pretrained(cfg.pretrained_model_name_or_path, **parts)
    pipe.save_pretrained(output_dir, safe_serialization=True)
    write_model_card(output_dir, cfg, "full", comps.family)
    if cfg.push_to_hub:
        push_to_hub(output_dir, cfg)


FULL = Task(name="full", setup=setup, save=save, uses_ema=True)


def main(argv: Sequence[str] | None = None) -> None:
    run_task(argv, FULL, __doc__)


if __name__ == "__main__":
    run_main(main)
