"""Evaluating a pipeline on the shapes world, by the one protocol every figure uses.

The diffusers pipeline as loaded, with `DPMSolverMultistepScheduler` built from its own scheduler config (UNet
models) or its own `FlowMatchEulerDiscreteScheduler` (flow models: SD 3, Flux), 20 steps, guidance 7.5, 64x64,
each prompt with seeds 0..n-1, scored by `toyworld.shapes.accuracy`.

Edit models (`FluxKontextPipeline`) are scored on held-out input images (`held_out_inputs`: shapes the training
pairs never showed): each is edited by ``make it {colour}`` through the pipeline with its own flow Euler sampler, 20
steps, at 64x64 (`max_area`, the input kept at that size rather than enlarged to Kontext's 1-megapixel sizes), and
scored by the shapes scorer: the output's shape must be the input's, its colour the asked one.
"""

from __future__ import annotations

import inspect

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from PIL import Image

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


def held_out_inputs(
    colours=shapes.BASE_COLOURS, per_class: int = 2, seed: int = 1000
) -> list[tuple[Image.Image, str, str]]:
    """Input images for edit scoring, (image, colour, shape), `per_class` per colour x shape, from a seed no
    training set uses."""
    rng = np.random.default_rng(seed)
    return [(shapes.render(c, s, rng), c, s) for c in colours for s in shapes.SHAPES for _ in range(per_class)]


@torch.no_grad()
def edit_images(pipe, images: list[Image.Image], prompt: str, seed: int = 0, steps: int = 20, size: int = 64):
    """`images` edited by `prompt` in one batch, image i from generator seed `seed + i`, as numpy arrays."""
    kwargs = {"max_area": size * size}
    if "_auto_resize" in inspect.signature(pipe.__call__).parameters:
        kwargs["_auto_resize"] = False
    tokenizer = getattr(pipe, "tokenizer_2", None)
    if tokenizer is not None:  # the T5 length the model was trained with (the pipeline pads to 512 otherwise)
        kwargs["max_sequence_length"] = min(512, tokenizer.model_max_length)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(images))]
    return pipe(
        image=images, prompt=[prompt] * len(images), num_inference_steps=steps, height=size, width=size,
        generator=generators, output_type="np", **kwargs,
    ).images  # fmt: skip


def edit_accuracy(pipe, inputs, colours, seeds: int = 1, steps: int = 20) -> shapes.Accuracy:
    """How often ``make it {colour}`` on `inputs` ((image, colour, shape) items) gives the asked colour and keeps
    the input's shape, over every colour in `colours` and seeds 0..seeds-1."""
    pipe.set_progress_bar_config(disable=True)
    colour_hits = shape_hits = n = 0
    for seed in range(seeds):
        for colour in colours:
            outputs = edit_images(pipe, [im for im, _, _ in inputs], shapes.instruction(colour), seed * 1000, steps)
            for output, (_, _, shape) in zip(outputs, inputs, strict=True):
                score = shapes.score_image(output)
                colour_hits += score.colour == colour
                shape_hits += score.shape == shape
                n += 1
    return shapes.Accuracy(colour_hits / n, shape_hits / n, n)
