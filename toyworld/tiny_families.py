"""Tiny pipelines of the 2026 families, built with plain diffusers from constructor arguments: nothing is downloaded.

`build_family_pipeline(family)` makes, with random weights,
- ``qwen_image``: `QwenImagePipeline` (Qwen-Image, Wu et al. 2025): an MMDiT over 2x2-packed latents of a causal 3D
  VAE (`AutoencoderKLQwenImage`, one frame, per-channel latent mean/std), conditioned on a Qwen2.5-VL's last hidden
  layer with its attention mask.

The scheduler configs are the released models' (Qwen-Image's resolution-dependent shift with a terminal sigma).
Widths are 16-32, one or two blocks. `sample_kwargs(family)` are the pipeline call's arguments that keep tiny runs
fast and deterministic (a short text length; no classifier-free guidance).
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLQwenImage,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
)

from difftune.toyworld.tiny_llm import load_llm_tokenizer, tiny_qwen25_vl

FAMILIES = ("qwen_image",)
TEXT_WIDTH = 16  # the tiny LLMs' hidden size
LATENT_CHANNELS = 4
TEST_MAX_SEQUENCE_LENGTH = 48  # text tokens per caption in tests: cheap, and more than any test caption needs


# Per family: the pipeline call's arguments that turn classifier-free guidance off (one transformer call a step).
NO_GUIDANCE: dict[str, dict] = {"qwen_image": {"true_cfg_scale": 1.0}}


def sample_kwargs(family: str) -> dict:
    """Arguments of `family`'s pipeline call for tiny test runs: a short text length and no classifier-free
    guidance."""
    return {"max_sequence_length": TEST_MAX_SEQUENCE_LENGTH, **NO_GUIDANCE[family]}


def _generator_normal(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def qwen_image_pipeline() -> QwenImagePipeline:
    tokenizer = load_llm_tokenizer("qwen")
    channels = LATENT_CHANNELS
    transformer = QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * channels, out_channels=channels, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_WIDTH, axes_dims_rope=(8, 4, 4),
    )  # fmt: skip
    # The released VAE's per-channel latent statistics normalise its latents; tiny ones are non-trivial on purpose.
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=channels, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.1 * i for i in range(channels)], latents_std=[1.0 + 0.2 * i for i in range(channels)],
    )  # fmt: skip
    # Qwen-Image's scheduler_config.json: shift by image size (0.5 at 256 tokens to 0.9 at 8192), terminal 0.02.
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )  # fmt: skip
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=tiny_qwen25_vl(tokenizer, TEXT_WIDTH),
                             tokenizer=tokenizer, transformer=transformer)  # fmt: skip


BUILDERS = {"qwen_image": qwen_image_pipeline}


def build_family_pipeline(family: str, seed: int = 0) -> DiffusionPipeline:
    """A randomly initialised tiny pipeline of `family` (one of `FAMILIES`)."""
    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    torch.manual_seed(seed)
    return BUILDERS[family]()


def save_family_pipeline(out_dir: str | Path, family: str, seed: int = 0) -> Path:
    """Builds a tiny `family` pipeline and saves it as a diffusers folder (safetensors); returns the folder."""
    out = Path(out_dir)
    build_family_pipeline(family, seed).save_pretrained(out)
    return out
