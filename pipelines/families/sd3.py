"""Stable Diffusion 3 / 3.5: `StableDiffusion3Pipeline`, an MMDiT (`SD3Transformer2DModel`; SD 3.5 adds
dual-attention layers and RMS qk-norm) trained with rectified flow (Esser et al. 2024).

Text conditioning as diffusers' pipeline builds it: the penultimate hidden states of two CLIP encoders
(with projection) concatenated on features and zero-padded to T5's width, then T5's sequence appended on the
token axis; the pooled projections of both CLIP encoders concatenated. T5 may be absent (a pipeline saved without
`text_encoder_3`, or one whose T5 outputs zeros, `outputs_zeros`): its part of the sequence is then zeros, as
diffusers does, and that is said once. Training
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
from difftune.pipelines.families.base import Family, sub_config

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
    def from_pretrained_kwargs(cls, index: dict, model: str) -> dict:
        """Absent optional parts passed as None: diffusers' SD3 pipeline does not count T5 as optional itself."""
        return {name: None for name in cls.optional_parts if (index.get(name) or [None])[0] is None}

    def sampling_scheduler(self):
        return type(self.noise_scheduler).from_config(self.noise_scheduler.config)

    @classmethod
    def load(cls, model: str, index: dict, denoiser=None, options: dict | None = None, text_encoders: bool = True,
             make_part=None):  # fmt: skip
        """As `Family.load`, with `--max_sequence_length` checked against the T5 tokenizer's config first."""
        cls.check_settings(model, index, options or {})
        return super().load(model, index, denoiser, options, text_encoders, make_part)

    @classmethod
    def check_settings(cls, model: str, index: dict, options: dict) -> None:
        """`--max_sequence_length` against the T5 tokenizer's config."""
        limit = None
        if (index.get(cls.tokenizer_names[-1]) or [None])[0] is not None:
            limit = sub_config(model, cls.tokenizer_names[-1], "tokenizer_config.json").get("model_max_length")
        cls.sequence_length(options.get("max_sequence_length"), limit)

    @classmethod
    def sequence_length(cls, wanted: int | None, limit: int | float | None) -> int:
        """The T5 length: `wanted` (`--max_sequence_length`), else the family's default cut to the tokenizer's
        limit; a `wanted` beyond the limit is a `UserError`."""
        if wanted is None:
            return int(min(cls.default_max_sequence_length, limit or cls.default_max_sequence_length))
        if limit is not None and wanted > limit:
            raise UserError(
                f"--max_sequence_length {wanted} is beyond the T5 tokenizer's limit of {int(limit)} tokens; give at "
                f"most {int(limit)}, or leave it out (default: {cls.default_max_sequence_length}, cut to the limit)"
            )
        return wanted

    def max_sequence_length(self) -> int:
        """The T5 length: `--max_sequence_length`, else the family's default, never past the tokenizer's limit."""
        tokenizer = self.parts.get(self.tokenizer_names[-1])
        limit = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
        return self.sequence_length(self.options.get("max_sequence_length"), limit)

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
        if encoder is None or outputs_zeros(encoder):
            return clip.new_zeros(clip.shape[0], 1, self.denoiser.config.joint_attention_dim)
        return encoder(ids["input_ids_3"].to(next(encoder.parameters()).device))[0]

    def without_t5(self) -> bool:
        """No T5, or a T5 that outputs zeros whatever the text (a stand-in that lets plain diffusers load a pipeline
        made without T5: `zero_t5`): both train on the one repeated zero token."""
        encoder = self.parts.get("text_encoder_3")
        return encoder is None or outputs_zeros(encoder)

    def stand_ins(self) -> dict:
        """Without T5, the stand-in `zero_t5`: the saved pipeline loads with plain diffusers and samples the same."""
        if "text_encoder_3" not in self.optional_parts or self.parts.get("text_encoder_3") is not None:
            return {}
        encoder, tokenizer = zero_t5(self.denoiser.config.joint_attention_dim)
        return {"text_encoder_3": encoder, "tokenizer_3": tokenizer}

    def text_cache_tag(self) -> str:
        t5 = "zero-token" if self.without_t5() else "t5"
        return f"{t5}:{self.max_sequence_length()}"

    def predict(self, denoiser, noisy, timesteps, cond, batch):
        extra = {}
        if self.without_t5():
            repeated_tokens.install(self.denoiser)
            extra["joint_attention_kwargs"] = {"last_token_repeats": self.max_sequence_length()}
        return denoiser(
            hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond["encoder_hidden_states"].to(noisy.dtype),
            pooled_projections=cond["pooled_projections"].to(noisy.dtype), return_dict=False, **extra,
        )[0]  # fmt: skip


def outputs_zeros(t5: torch.nn.Module) -> bool:
    """Whether a T5 encoder's output is zero for any text: its final norm's weight is all zeros. On the meta device
    (the memory planner), where weights have no values, the stand-in is told by its architecture: no layers."""
    norm = getattr(getattr(t5, "encoder", None), "final_layer_norm", None)
    if norm is not None and norm.weight.device.type == "meta":
        return len(t5.encoder.block) == 0
    return norm is not None and not bool(norm.weight.detach().any())


# diffusers' SD 3 pipeline feeds this many T5 tokens by default (`max_sequence_length=256`).
SEQUENCE_LENGTH = 256


def zero_t5(width: int):
    """A T5 stand-in (`T5EncoderModel`, `T5TokenizerFast`) for an SD 3 pipeline without T5: an encoder of no layers
    whose final norm's weight is zero, so its output is zeros of `width` (the transformer's `joint_attention_dim`)
    for any text, exactly what diffusers' SD 3 pipeline feeds in T5's place when there is none, and a tokenizer of
    three tokens (the text does not matter). A pipeline saved with it loads with plain
    `DiffusionPipeline.from_pretrained` (diffusers' SD 3 pipeline does not count T5 as optional: a folder whose
    model_index.json records it as [null, null] does not load without `text_encoder_3=None, tokenizer_3=None`),
    samples the same images, and trains as one without T5 (`outputs_zeros`). A few kB."""
    from tokenizers import Tokenizer, pre_tokenizers, processors
    from tokenizers.models import Unigram
    from transformers import T5Config, T5EncoderModel, T5TokenizerFast

    pieces = Tokenizer(Unigram([("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)], unk_id=2, byte_fallback=False))
    pieces.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    pieces.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    tokenizer = T5TokenizerFast(tokenizer_object=pieces, extra_ids=0, model_max_length=SEQUENCE_LENGTH)
    config = T5Config(
        vocab_size=3, d_model=width, d_kv=width, d_ff=width, num_layers=0, num_heads=1, feed_forward_proj="gated-gelu",
        tie_word_embeddings=False, dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # fmt: skip
    encoder = T5EncoderModel(config)
    torch.nn.init.zeros_(encoder.encoder.final_layer_norm.weight)
    return encoder, tokenizer
