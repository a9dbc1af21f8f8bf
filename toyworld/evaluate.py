"""Evaluating a Stable Diffusion pipeline on the shapes world, by the one protocol every figure uses.

diffusers' `StableDiffusionPipeline` with `DPMSolverMultistepScheduler` built from the pipeline's own scheduler
config, 20 steps, guidance 7.5, 64x64, each prompt with seeds 0..n-1, scored by `toyworld.shapes.accuracy`.
"""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler

from toyworld import shapes


@torch.no_grad()
def generate_for_prompts(
    pipe, prompts: list[str], seeds: int = 4, steps: int = 20, guidance_scale: float = 7.5, size: int = 64
) -> tuple[list, list[str]]:
    """Images of every prompt for seeds 0..seeds-1, batched per seed; returns (images, their prompts)."""
    images, used = [], []
    device = pipe.unet.device
    for seed in range(seeds):
        generators = [torch.Generator(device="cpu").manual_seed(seed) for _ in prompts]
        out = pipe(
            prompts, num_inference_steps=steps, guidance_scale=guidance_scale, height=size, width=size,
            generator=generators, output_type="np",
        ).images  # fmt: skip
        images.extend(list(out))
        used.extend(prompts)
    del device
    return images, used


def shapes_accuracy(pipe, prompts: list[str], seeds: int = 4, steps: int = 20, guidance_scale: float = 7.5):
    """Colour and shape accuracy of `pipe` on `prompts` (see the module docstring for the protocol)."""
    original = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(original.config)
    pipe.set_progress_bar_config(disable=True)
    try:
        images, used = generate_for_prompts(pipe, prompts, seeds, steps, guidance_scale)
    finally:
        pipe.scheduler = original
    return shapes.accuracy(images, used), images
