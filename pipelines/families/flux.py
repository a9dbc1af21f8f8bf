"""Flux.1: `FluxPipeline`, a transformer of double- and single-stream blocks (`FluxTransformer2DModel`) trained
with rectified flow on 2x2-packed latents.

As diffusers' pipeline builds it: CLIP's pooled output conditions the modulation (`pooled_projections`), T5's
sequence is the text stream (`encoder_hidden_states`, with all-zero position ids `txt_ids`), latents (B, C, h, w)
are packed into (B, h/2 * w/2, 4C) tokens with (0, row, column) position ids `img_ids`, and the timestep is given
as t / 1000. Guidance-distilled models (`guidance_embeds`, Flux.1-dev) are also conditioned on a guidance value
(`--guidance_scale`, 3.5 by default as in diffusers' Flux scripts); others refuse the flag.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from einops import rearrange

from difftune.core.errors import UserError
from difftune.pipelines.families.sd3 import ATTENTION, FEED_FORWARD, StableDiffusion3

DEFAULT_GUIDANCE = 3.5


class Flux(StableDiffusion3):
    name: ClassVar[str] = "flux"
    pipeline_class_name: ClassVar[str] = "FluxPipeline"
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")
    optional_parts: ClassVar[tuple[str, ...]] = ()
    passes_sigmas: ClassVar[bool] = True
    guidance_batch: ClassVar[int] = 1  # guidance-distilled: one denoiser call per image, no negative batch
    adaptable_text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)  # CLIP, not T5
    lora_targets: ClassVar[tuple[str, ...]] = (*ATTENTION, *FEED_FORWARD)
    default_max_sequence_length: ClassVar[int] = 512  # diffusers' Flux training scripts

    def check_options(self) -> None:
        guided = bool(self.denoiser.config.get("guidance_embeds", False))
        if self.options.get("guidance_scale") is not None and not guided:
            raise UserError(
                f"--guidance_scale: {self.model} has no guidance embeddings (not a guidance-distilled Flux model); "
                "drop the flag"
            )

    def text_cache_tag(self) -> str:
        return f"t5:{self.max_sequence_length()}"

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        clip, t5 = self.parts["tokenizer"], self.parts["tokenizer_2"]
        return {
            "input_ids": clip(captions, padding="max_length", max_length=clip.model_max_length, truncation=True,
                              return_tensors="pt").input_ids,
            "input_ids_2": t5(captions, padding="max_length", max_length=self.max_sequence_length(), truncation=True,
                              return_tensors="pt").input_ids,
        }  # fmt: skip

    def encode_text(self, ids, encoders=None) -> dict:
        encoders = encoders or self.text_encoders()
        clip, t5 = encoders["text_encoder"], encoders["text_encoder_2"]
        pooled = clip(ids["input_ids"].to(next(clip.parameters()).device), output_hidden_states=False).pooler_output
        sequence = t5(ids["input_ids_2"].to(next(t5.parameters()).device), output_hidden_states=False)[0]
        return {"encoder_hidden_states": sequence, "pooled_projections": pooled}  # (B, L, D_T5), (B, D_CLIP)

    def predict(self, denoiser, noisy, timesteps, cond, batch):
        _, _, h, w = noisy.shape
        out = self.run_transformer(denoiser, pack(noisy), latent_ids(h // 2, w // 2, noisy), timesteps, cond)
        return unpack(out, h, w)

    def run_transformer(self, denoiser, tokens, img_ids, timesteps, cond) -> torch.Tensor:
        """The transformer's output tokens (B, N, 4C) for packed image tokens (B, N, 4C) and their ids (N, 3)."""
        text = cond["encoder_hidden_states"].to(tokens.dtype)
        guidance = None
        if self.denoiser.config.get("guidance_embeds", False):  # the family's own (unwrapped) module
            value = self.options.get("guidance_scale") or DEFAULT_GUIDANCE
            guidance = torch.full((tokens.shape[0],), float(value), device=tokens.device, dtype=torch.float32)
        return denoiser(
            hidden_states=tokens, timestep=timesteps.to(tokens.dtype) / 1000, guidance=guidance,
            pooled_projections=cond["pooled_projections"].to(tokens.dtype), encoder_hidden_states=text,
            txt_ids=text.new_zeros(text.shape[1], 3), img_ids=img_ids, return_dict=False,
        )[0]  # fmt: skip


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) latents as (B, h/2 * w/2, 4C) tokens of 2x2 patches (`FluxPipeline._pack_latents`)."""
    return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(B, h/2 * w/2, 4C) tokens back to (B, C, h, w) latents."""
    return rearrange(tokens, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h // 2, w=w // 2, ph=2, pw=2)


def latent_ids(rows: int, cols: int, like: torch.Tensor, index: int = 0) -> torch.Tensor:
    """(rows * cols, 3) position ids (index, row, column) of a packed image (`_prepare_latent_image_ids`); Kontext
    gives its input image index 1."""
    ids = torch.zeros(rows, cols, 3, device=like.device, dtype=like.dtype)
    ids[..., 0] = index
    ids[..., 1] += torch.arange(rows, device=like.device)[:, None]
    ids[..., 2] += torch.arange(cols, device=like.device)[None, :]
    return ids.reshape(-1, 3)
