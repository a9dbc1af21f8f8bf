"""The text pass: a family's large text encoders loaded alone, every caption encoded and cached, then freed, all
before the denoiser loads.

The 2026 families read their text through LLMs (Qwen2.5-VL 7B for Qwen-Image, Mistral Small 3.1 24B for Flux.2 dev,
Qwen3 4-8B for Flux.2 klein and Z-Image): in bf16 up to 48 GB, more than the denoiser. Their outputs are constants
when the encoder is frozen, so with caching on (`Family.text_first`, --cache_latents, captions that never change)
the encoder is loaded by itself, encodes the training captions, the held-out ones, the validation prompts and the
empty caption (caption dropout's, and the negative prompt of validation images), and is freed: the denoiser never
shares memory with it. It runs on the accelerator when its weights fit in the free memory there, otherwise on the
CPU (slower, and once: the embeddings are cached on disk with their masks, `finetune.cache.encode_captions`).
Without caching the encoder stays loaded beside the denoiser and runs every step (said in one line).
"""

from __future__ import annotations

import gc
import logging

import torch

from difftune.finetune.data import cache_dir, cache_text, caches_text

logger = logging.getLogger(__name__)
HEADROOM = 0.85  # share of the accelerator's free memory the encoder's weights may take; the rest for activations


def uses_text_pass(cfg, family_cls) -> bool:
    """Whether this run encodes its text in a pass of its own (a `text_first` family with cached text)."""
    return family_cls.text_first and caches_text(cfg, family_cls, trained={})


def fits_beside(need: float, free: float) -> bool:
    """Whether text encoders of `need` bytes are put on an accelerator with `free` bytes (the memory planner asks
    this as the loop does)."""
    return need <= HEADROOM * free


def text_device(modules: list[torch.nn.Module], device: torch.device) -> torch.device:
    """`device` when the modules' weights fit in its free memory (with room for activations), else the CPU."""
    if device.type != "cuda":
        return device
    need = sum(p.numel() * p.element_size() for m in modules for p in m.parameters())
    free, _ = torch.cuda.mem_get_info(device)
    if fits_beside(need, free):
        return device
    logger.warning(
        "the text encoder's %.1f GB do not fit in the %.1f GB free on %s: encoding the captions on the CPU (slower, "
        "once; the embeddings are cached)", need / 2**30, free / 2**30, device,
    )  # fmt: skip
    return torch.device("cpu")


def run_text_pass(cfg, family_cls, model: str, index: dict, captions: list[str], device, dtype) -> dict[str, dict]:
    """Each of `captions` (and "") encoded by `family_cls`'s text encoders loaded alone, cached on disk; the
    encoders are freed before this returns."""
    family = family_cls.load_text(model, index, cfg.model.family_options(), dtype)
    encoders = list(family.text_encoders().values())
    where = text_device(encoders, torch.device(device))
    for encoder in encoders:
        encoder.requires_grad_(False).eval()
        # CPU matmuls have no fp16 kernels worth using: bf16 keeps the memory, fp32 stays fp32
        encoder.to(where, dtype if where.type != "cpu" or dtype != torch.float16 else torch.bfloat16)
    text = cache_text(family, sorted(set(captions)), cache_dir(cfg))
    del family, encoders
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    logger.info("text pass: %d captions encoded or read from the cache; the text encoder is freed", len(text))
    return text


def say_uncached_cost(family) -> None:
    """One line on what training a `text_first` family without cached text costs."""
    params = sum(p.numel() for m in family.text_encoders().values() for p in m.parameters())
    logger.warning(
        "text caching is off: the %s text encoder (%.2fB parameters) stays loaded beside the %s and encodes every "
        "batch; --cache_latents without --shuffle_caption encodes each caption once and frees it first",
        family.name, params / 1e9, family.denoiser_name,
    )  # fmt: skip
