"""Validation images during training: generated with the weights being trained, saved and logged.

The pipeline is assembled around the live modules without casting them (casting the shared UNet to fp16 is the
cause of diffusers' "Attempting to unscale FP16 gradients" reports); autocast handles mixed precision.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from PIL import Image

from core.images import make_grid


@torch.no_grad()
def log_validation(comps, accelerator, cfg, step: int, weight_dtype) -> list[Image.Image]:
    unet = accelerator.unwrap_model(comps.unet)
    was_training = unet.training
    unet.eval()
    parts = dict(
        vae=comps.vae, text_encoder=accelerator.unwrap_model(comps.text_encoder), tokenizer=comps.tokenizer,
        unet=unet, scheduler=DPMSolverMultistepScheduler.from_config(comps.noise_scheduler.config),
    )  # fmt: skip
    if comps.family == "sdxl":
        text_encoder_2 = accelerator.unwrap_model(comps.text_encoder_2)
        pipe = StableDiffusionXLPipeline(**parts, text_encoder_2=text_encoder_2, tokenizer_2=comps.tokenizer_2)
    else:
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.set_progress_bar_config(disable=True)
    folder = Path(cfg.output_dir) / "validation" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    autocast = torch.autocast(accelerator.device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)
    for p, prompt in enumerate(cfg.validation_prompt):
        generator = torch.Generator("cpu").manual_seed(cfg.seed)
        with autocast:
            out = pipe(
                [prompt] * cfg.num_validation_images, num_inference_steps=cfg.validation_inference_steps,
                height=cfg.resolution, width=cfg.resolution, generator=generator,
            ).images  # fmt: skip
        for i, image in enumerate(out):
            image.save(folder / f"{p:02d}_{i:02d}.png")
        images.extend(out)
    grid = make_grid(images, cols=cfg.num_validation_images)
    grid.save(folder / "grid.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
    if was_training:
        unet.train()
    return images
