"""Stable Diffusion XL: `StableDiffusionXLPipeline`, a UNet conditioned on two CLIP text encoders (penultimate
hidden states concatenated, the second's pooled projection) and on size/crop micro-conditioning (`time_ids`:
original size, crop top-left, target size), as diffusers' SDXL pipeline and training scripts build them.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from difftune.pipelines.families.sd import StableDiffusion1


class StableDiffusionXL(StableDiffusion1):
    name: ClassVar[str] = "sdxl"
    pipeline_class_name: ClassVar[str] = "StableDiffusionXLPipeline"
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2")

    @classmethod
    def from_pretrained_kwargs(cls, index: dict, model: str) -> dict:
        return {}

    def pipeline_extras(self) -> dict:
        return {}

    def encode_text(self, ids, encoders=None) -> dict:
        encoders = encoders or self.text_encoders()
        te1, te2 = encoders["text_encoder"], encoders["text_encoder_2"]
        out1 = te1(ids["input_ids"].to(next(te1.parameters()).device), output_hidden_states=True)
        out2 = te2(ids["input_ids_2"].to(next(te2.parameters()).device), output_hidden_states=True)
        hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)  # (B, L, D1 + D2)
        return {"encoder_hidden_states": hidden, "text_embeds": out2[0]}  # pooled projection (B, D2)

    def predict(self, denoiser, noisy, timesteps, cond, batch):
        added = {"text_embeds": cond["text_embeds"].to(noisy.dtype), "time_ids": batch["time_ids"].to(noisy.dtype)}
        hidden = cond["encoder_hidden_states"].to(noisy.dtype)
        return denoiser(noisy, timesteps, hidden, added_cond_kwargs=added, return_dict=False)[0]
