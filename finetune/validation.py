"""Validation images during training: generated with the weights being trained, saved and logged.

The pipeline is assembled around the live modules without casting them (casting the shared UNet to fp16 is the
cause of diffusers' "Attempting to unscale FP16 gradients" reports); autocast handles mixed precision.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from difftune.core.config import PASSIVE, option
from difftune.core.errors import UserError
from difftune.core.images import make_grid


@dataclass
class ValidationConfig:
    """Validation images: prompts sampled with the live weights every --validation_steps."""

    validation_prompt: list[str] | None = option("Prompts for validation images.", default=None, resume=PASSIVE,
                                                 card=False)  # fmt: skip
    num_validation_images: int = option("Images per validation prompt.", default=4, resume=PASSIVE, card=False)
    validation_steps: int = option("Validation images and validation loss every N steps.", default=100,
                                   resume=PASSIVE, card=False)  # fmt: skip
    validation_inference_steps: int = option("Sampler steps for validation images.", default=20, resume=PASSIVE,
                                             card=False)  # fmt: skip

    def validate(self) -> None:
        for name in ("validation_steps", "num_validation_images", "validation_inference_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1")


@torch.no_grad()
def log_validation(family, models: dict, accelerator, cfg, step: int, weight_dtype) -> list[Image.Image]:
    """Images of each `--validation_prompt` from the live modules (`models`: the trained ones, as prepared), saved
    under `validation/step-N/` with a grid, and logged to tensorboard. Call it on every process; the main one works."""
    if not accelerator.is_main_process:
        return []
    live = {name: accelerator.unwrap_model(model) for name, model in models.items()}
    was_training = {name: module.training for name, module in live.items()}
    for module in live.values():
        module.eval()
    pipe = family.pipeline(family.sampling_scheduler(), **live)
    pipe.set_progress_bar_config(disable=True)
    folder = Path(cfg.training.output_dir) / "validation" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    autocast = torch.autocast(accelerator.device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)
    for p, prompt in enumerate(cfg.validation.validation_prompt):
        generator = torch.Generator("cpu").manual_seed(cfg.training.seed)
        with autocast:
            out = pipe(
                [prompt] * cfg.validation.num_validation_images, num_inference_steps=cfg.validation.validation_inference_steps,
                height=cfg.data.resolution, width=cfg.data.resolution, generator=generator,
            ).images  # fmt: skip
        for i, image in enumerate(out):
            image.save(folder / f"{p:02d}_{i:02d}.png")
        images.extend(out)
    grid = make_grid(images, cols=cfg.validation.num_validation_images)
    grid.save(folder / "grid.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
    for name, module in live.items():
        module.train(was_training[name])
    return images
