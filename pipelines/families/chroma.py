"""Chroma: `ChromaPipeline`, Flux.1-schnell's double- and single-stream transformer with the per-block modulation
replaced by one small approximator network (`ChromaTransformer2DModel`), trained with rectified flow on 2x2-packed
latents and conditioned on T5 alone (lodestones 2025, Chroma).

As the pipeline builds it: T5 reads each caption padded to `--max_sequence_length` tokens (512 by default, the
pipeline's) with its attention mask, and the text stream keeps every position with a mask that leaves exactly one
padding token visible (Chroma's training recipe); the transformer's attention mask is that text mask followed by
ones for the image tokens. Latents are shifted and scaled by the VAE config and packed as Flux.1's, with Flux.1's
position ids; the timestep is t / 1000; there is no guidance input and no pooled text. The scheduler is Flux.1-dev's
(resolution-dependent shift), and training sigmas are moved by the same shift the pipeline samples with. diffusers
ships no Chroma training script. T5 is never trained (`--train_text_encoder` is refused, as T5 is for Flux.1); with
cached text it encodes the captions in a pass of its own and is freed before the transformer loads.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from einops import rearrange

from difftune.pipelines.families.base import dynamic_shift
from difftune.pipelines.families.flux import Flux


class Chroma(Flux):
    name: ClassVar[str] = "chroma"
    pipeline_class_name: ClassVar[str] = "ChromaPipeline"
    text_encoder_names: ClassVar[tuple[str, ...]] = ("text_encoder",)
    tokenizer_names: ClassVar[tuple[str, ...]] = ("tokenizer",)
    adaptable_text_encoders: ClassVar[tuple[str, ...]] = ()
    text_first: ClassVar[bool] = True  # T5-XXL, 4.7B parameters, is its only text encoder

    def check_options(self) -> None:
        self.max_sequence_length()

    def text_cache_tag(self) -> str:
        return f"t5-masked:{self.max_sequence_length()}"

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        tokens = self.parts["tokenizer"](captions, padding="max_length", max_length=self.max_sequence_length(),
                                         truncation=True, return_tensors="pt")  # fmt: skip
        return {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}

    def encode_text(self, ids, encoders=None) -> dict:
        encoder = (encoders or self.text_encoders())["text_encoder"]
        device = next(encoder.parameters()).device
        tokens = ids["attention_mask"].to(device)
        sequence = encoder(ids["input_ids"].to(device), attention_mask=tokens, output_hidden_states=False)[0]
        # The valid tokens and the first padding token after them (`<=`, not `<`), as ChromaPipeline masks them.
        positions = torch.arange(tokens.shape[1], device=device)[None]
        mask = (positions <= tokens.sum(dim=1, keepdim=True)).to(sequence.dtype)
        return {"encoder_hidden_states": sequence, "attention_mask": mask}  # (B, L, D), (B, L)

    def embedding_inputs(self, conds: list[dict], empty: dict | None) -> dict:
        inputs = {"prompt_embeds": torch.stack([c["encoder_hidden_states"] for c in conds]),
                  "prompt_attention_mask": torch.stack([c["attention_mask"] for c in conds])}  # fmt: skip
        if empty is not None:  # classifier-free guidance's negative: the empty prompt
            n = len(conds)
            inputs["negative_prompt_embeds"] = empty["encoder_hidden_states"].expand(n, -1, -1)
            inputs["negative_prompt_attention_mask"] = empty["attention_mask"].expand(n, -1)
        return inputs

    def shift_sigmas(self, sigmas: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return dynamic_shift(self.noise_scheduler, sigmas, latent_shape[-2] * latent_shape[-1] // 4)

    def predict(self, denoiser, noisy, timesteps, cond, batch):
        b, c, h, w = noisy.shape
        tokens = rearrange(noisy, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)  # _pack_latents
        img_ids = torch.zeros(h // 2, w // 2, 3, device=noisy.device, dtype=noisy.dtype)
        img_ids[..., 1] += torch.arange(h // 2, device=noisy.device)[:, None]
        img_ids[..., 2] += torch.arange(w // 2, device=noisy.device)[None, :]
        text = cond["encoder_hidden_states"].to(noisy.dtype)
        text_mask = cond["attention_mask"].to(noisy.device, noisy.dtype)
        mask = torch.cat([text_mask, text_mask.new_ones(b, tokens.shape[1])], dim=1)  # text first, then the image
        out = denoiser(
            hidden_states=tokens, timestep=timesteps.to(noisy.dtype) / 1000, encoder_hidden_states=text,
            txt_ids=text.new_zeros(text.shape[1], 3), img_ids=img_ids.reshape(-1, 3), attention_mask=mask,
            return_dict=False,
        )[0]  # fmt: skip
        return rearrange(out, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h // 2, w=w // 2, ph=2, pw=2)
