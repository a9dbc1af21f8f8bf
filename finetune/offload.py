"""Frozen parts a cached run does not need on the accelerator: kept in CPU memory while training.

With latents cached the VAE only decodes validation images; with text embeddings cached the frozen text encoders
only encode validation prompts. On a GPU that is the biggest saving of the flow families (T5-XXL is 4.7B
parameters, 9.5 GB in bf16, and never has to be resident while training), and a useful one for SDXL's two
encoders. They come back to the device only around validation images (`resident`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


def offload_plan(text_encoders: list[str], trained: set[str], latents_cached: bool, text_cached: bool) -> list[str]:
    """Which components to keep off the accelerator: the VAE when latents are cached, the untrained text
    encoders when text embeddings are."""
    plan = ["vae"] if latents_cached else []
    if text_cached:
        plan += [name for name in text_encoders if name not in trained]
    return plan


def offload(family, names: list[str], device: torch.device) -> list[str]:
    """Moves `names` to CPU memory when training on an accelerator; returns what was moved."""
    if device.type == "cpu" or not names:
        return []
    for name in names:
        family.parts[name].to("cpu")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return names


@contextmanager
def resident(family, names: list[str], device: torch.device) -> Iterator[None]:
    """`names` on `device` for the duration (validation images), then back in CPU memory."""
    for name in names:
        family.parts[name].to(device)
    try:
        yield
    finally:
        for name in names:
            family.parts[name].to("cpu")
