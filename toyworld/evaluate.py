"""Evaluating a pipeline on the shapes world, by the one protocol every figure uses.

The diffusers pipeline as loaded, with `DPMSolverMultistepScheduler` built from its own scheduler config (UNet
models) or its own `FlowMatchEulerDiscreteScheduler` (flow models: SD 3, Flux), 20 steps, guidance 7.5, 64x64,
each prompt with seeds 0..n-1, scored by `toyworld.shapes.accuracy`.
"""

from __future__ import annotations

import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

from difftune.toyworld import shapes


@torch.no_grad()
def generate_for_prompts(
    pipe, prompts: list[str], seeds: int = 4, steps: int = 20, guidance_scale: float = 7.5, size: int = 64
) -> tuple[list, list[str]]:
    """Images of every prompt for seeds 0..seeds-1, batched per seed; returns (images, their prompts)."""
    images, used = [], []
    for seed in range(seeds):
        generators = [torch.Generator(device="cpu").manual_seed(seed) for _ in prompts]
        out = pipe(
            prompts, num_inference_steps=steps, guidance_scale=guidance_scale, height=size, width=size,
            generator=generators, output_type="np",
        ).images  # fmt: skip
        images.extend(list(out))
        used.extend(prompts)
    return images, used


def shapes_accuracy(pipe, prompts: list[str], seeds: int = 4, steps: int = 20, guidance_scale: float = 7.5):
    """Colour and shape accuracy of `pipe` on `prompts` (see the module docstring for the protocol)."""
    original = pipe.scheduler
    if not isinstance(original, FlowMatchEulerDiscreteScheduler):  # a flow model keeps its own Euler sampler
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(original.config)
    pipe.set_progress_bar_config(disable=True)
    try:
        images, used = generate_for_prompts(pipe, prompts, seeds, steps, guidance_scale)
    finally:
        pipe.scheduler = original
    return shapes.accuracy(images, used), images
