"""Stable Diffusion 3 / 3.5: `StableDiffusion3Pipeline`, an MMDiT (`SD3Transformer2DModel`; SD 3.5 adds
dual-attention layers and RMS qk-norm) trained with rectified flow (Esser et al. 2024).

Text conditioning as diffusers' pipeline builds it: the penultimate hidden states of two CLIP encoders
(with projection) concatenated on features and zero-padded to T5's width, then T5's sequence appended on the
token axis; the pooled projections of both CLIP encoders concatenated. T5 may be absent (a pipeline saved without
`text_encoder_3`): its part of the sequence is then zeros, as diffusers does, and that is said once. Training
then feeds one zero token that attention counts as `max_sequence_length` of them (`repeated_tokens`): the same
model, without paying for 256 identical tokens a step.
"""

from __future__ import annotations

import logging
from typing import ClassVar

import torch
import torch.nn.functional as F

from difftune.core.errors import UserError
from difftune.pipelines.families import repeated_tokens
from difftune.pipelines.families.base import Family

logger = logging.getLogger(__name__)

ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_add_out")  # fmt: skip
FEED_FORWARD = ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


class StableDiffusion3(Family):
    name: ClassVar[str] = "sd3"
    pipeline_class_name: ClassVar[str] = "StableDiffusion3Pipeline"
    denoiser_name: ClassVar[str] = "transformer"
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2", "text_encoder_3")
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer", "tokenizer_2", "tokenizer_3")
    optional_parts: ClassVar[tuple[str, ...]] = ("text_encoder_3", "tokenizer_3")
    adaptable_text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder", "text_encoder_2")  # CLIP, not T5
    objective: ClassVar[str] = "flow"
    default_sampler: ClassVar[str] = "flow-euler"
    # SD 3.5's dual-attention blocks name their second attention `attn2`.
    lora_targets: ClassVar[tuple[str, ...]] = (*ATTENTION, *(a.replace("attn.", "attn2.") for a in ATTENTION[:4]),
                                               *FEED_FORWARD)  # fmt: skip
    default_max_sequence_length: ClassVar[int] = 77  # diffusers' SD3 training scripts

    @classmethod
    def matches(cls, index: dict, model: str) -> bool:
        return index.get("_class_name") == cls.pipeline_class_name

    @classmethod
    def load_noise_scheduler(cls, model: str, **options):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")

    @classmethod
    def from_pretrained_kwargs(cls, index: dict) -> dict:
        """Absent optional parts passed as None: diffusers' SD3 pipeline does not count T5 as optional itself."""
        return {name: None for name in cls.optional_parts if (index.get(name) or [None])[0] is None}

    def sampling_scheduler(self):
        return type(self.noise_scheduler).from_config(self.noise_scheduler.config)

    def max_sequence_length(self) -> int:
        """The T5 length: `--max_sequence_length`, else the family's default, never past the tokenizer's limit."""
        tokenizer = self.parts.get(self.tokenizer_names[-1])
        wanted = self.options.get("max_sequence_length") or self.default_max_sequence_length
        limit = getattr(tokenizer, "model_max_length", wanted) if tokenizer is not None else wanted
        if wanted > limit:
            raise UserError(f"--max_sequence_length {wanted} is beyond the T5 tokenizer's limit of {limit} tokens")
        return wanted

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        for key, name in zip(("input_ids", "input_ids_2", "input_ids_3"), self.tokenizer_names, strict=True):
            tok = self.parts.get(name)
            if tok is None:
                continue
            length = self.max_sequence_length() if name == "tokenizer_3" else tok.model_max_length
            out[key] = tok(captions, padding="max_length", max_length=length, truncation=True,
                           return_tensors="pt").input_ids  # fmt: skip
        return out

    def encode_text(self, ids, encoders=None) -> dict:
        encoders = encoders or self.text_encoders()
        clip_hidden, pooled = [], []
        for key, name in (("input_ids", "text_encoder"), ("input_ids_2", "text_encoder_2")):
            encoder = encoders[name]
            out = encoder(ids[key].to(next(encoder.parameters()).device), output_hidden_states=True)
            clip_hidden.append(out.hidden_states[-2])  # (B, 77, D_i)
            pooled.append(out[0])  # text_embeds: the projected pooled output (B, P_i)
        clip = torch.cat(clip_hidden, dim=-1)  # (B, 77, D_1 + D_2)
        t5 = self._t5(ids, encoders, clip)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # zero-padded to T5's width
        return {"encoder_hidden_states": torch.cat([clip, t5], dim=-2), "pooled_projections": torch.cat(pooled, -1)}

    def _t5(self, ids, encoders, clip: torch.Tensor) -> torch.Tensor:
        """T5's sequence (B, L, D_T5); without T5, one zero token of the transformer's joint width, which `predict`
        has attention count as the `max_sequence_length` zero tokens diffusers' pipeline feeds."""
        encoder = encoders.get("text_encoder_3")
        if encoder is None:
            return clip.new_zeros(clip.shape[0], 1, self.denoiser.config.joint_attention_dim)
        return encoder(ids["input_ids_3"].to(next(encoder.parameters()).device))[0]

    def text_cache_tag(self) -> str:
        t5 = "zero-token" if self.parts.get("text_encoder_3") is None else "t5"
        return f"{t5}:{self.max_sequence_length()}"

    def predict(self, denoiser, noisy, timesteps, cond, batch):
        extra = {}
        if self.parts.get("text_encoder_3") is None:
            repeated_tokens.install(self.denoiser)
            extra["joint_attention_kwargs"] = {"last_token_repeats": self.max_sequence_length()}
        return denoiser(
            hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond["encoder_hidden_states"].to(noisy.dtype),
            pooled_projections=cond["pooled_projections"].to(noisy.dtype), return_dict=False, **extra,
        )[0]  # fmt: skip
