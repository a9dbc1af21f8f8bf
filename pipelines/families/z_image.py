"""Z-Image: `ZImagePipeline`, a single-stream diffusion transformer (`ZImageTransformer2DModel`, S3-DiT: text and
image tokens in one sequence) trained with rectified flow, conditioned on Qwen3 (Z-Image team 2025, "Z-Image: An
Efficient Image Generation Foundation Model with Single-Stream Diffusion Transformer").

As the pipeline builds it: each caption goes into Qwen3's chat format as the user turn with the generation prompt
(`enable_thinking=True`, the pipeline's choice: no empty think block), Qwen3 reads it with its attention mask, and
the penultimate hidden layer at the valid tokens is the caption (a list of variable-length tensors for the
transformer; here right-padded with a mask, `cap_feats`/`cap_mask`, and unpadded again in `predict`). Latents are
the Flux-style VAE's, shifted and scaled by its config; the transformer takes a list of (C, 1, h, w) latents, the
timestep as 1 - t / 1000 (it counts from noise to image), and predicts the negated velocity, which `predict` negates
back. The released Z-Image-Turbo scheduler shifts statically (shift 3), so the training sigmas are the scheduler's;
a checkpoint whose scheduler enables dynamic shifting gets the pipeline's resolution-dependent shift.

Where diffusers' `train_dreambooth_lora_z_image.py` differs, and why: its default LoRA targets are the attention
projections only; here the feed-forward layers too (`--target_modules` narrows them). As it does, latents are the
posterior mean, and the text encoder is never trained (`--train_text_encoder` is refused).
"""

from __future__ import annotations

from typing import ClassVar

import torch

from difftune.pipelines.families.base import Family, dynamic_shift, pad_sequences

ATTENTION = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0")
FEED_FORWARD = ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


class ZImage(Family):
    name: ClassVar[str] = "z_image"
    pipeline_class_name: ClassVar[str] = "ZImagePipeline"
    denoiser_name: ClassVar[str] = "transformer"
    objective: ClassVar[str] = "flow"
    default_sampler: ClassVar[str] = "flow-euler"
    passes_sigmas: ClassVar[bool] = True
    unfit_samplers: ClassVar[dict[str, str]] = {
        "flow-unipc": "the pipeline hands its sigmas as a list, which UniPC's flow shift cannot multiply"
    }
    text_first: ClassVar[bool] = True
    sample_posterior: ClassVar[bool] = False
    adaptable_text_encoders: ClassVar[tuple[str, ...]] = ()
    lora_targets: ClassVar[tuple[str, ...]] = (*ATTENTION, *FEED_FORWARD)
    default_max_sequence_length: ClassVar[int] = 512  # ZImagePipeline.__call__'s

    @classmethod
    def matches(cls, index: dict, model: str) -> bool:
        return index.get("_class_name") == cls.pipeline_class_name

    @classmethod
    def load_noise_scheduler(cls, model: str, **options):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")

    def sampling_scheduler(self):
        return type(self.noise_scheduler).from_config(self.noise_scheduler.config)

    # --- text ------------------------------------------------------------------------------------------

    def max_sequence_length(self) -> int:
        return self.options.get("max_sequence_length") or self.default_max_sequence_length

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Padded to the batch's longest, not to `max_sequence_length` as the pipeline pads: the encoder is causal
        and only the valid tokens are kept, so the padding changes nothing but the cost."""
        tokenizer = self.parts["tokenizer"]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=True) for c in captions]  # fmt: skip
        tokens = tokenizer(texts, padding=True, truncation=True, max_length=self.max_sequence_length(),
                           return_tensors="pt")  # fmt: skip
        return {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}

    def encode_text(self, ids, encoders=None) -> dict:
        encoder = (encoders or self.text_encoders())["text_encoder"]
        device = next(encoder.parameters()).device
        mask = ids["attention_mask"].to(device).bool()
        hidden = encoder(input_ids=ids["input_ids"].to(device), attention_mask=mask, output_hidden_states=True)
        valid = [h[m] for h, m in zip(hidden.hidden_states[-2], mask, strict=True)]  # each (L_i, D)
        masks = [torch.ones(len(v), dtype=torch.long, device=device) for v in valid]
        return {"cap_feats": pad_sequences(valid), "cap_mask": pad_sequences(masks)}

    def text_cache_tag(self) -> str:
        return f"z-image-chat:{self.max_sequence_length()}"

    @staticmethod
    def captions(cond: dict) -> list[torch.Tensor]:
        """The transformer's list of variable-length captions (L_i, D) from padded ones and their mask."""
        return [f[m.bool()] for f, m in zip(cond["cap_feats"], cond["cap_mask"], strict=True)]

    def embedding_inputs(self, conds: list[dict], empty: dict | None) -> dict:
        inputs = {"prompt_embeds": [c["cap_feats"][c["cap_mask"].bool()] for c in conds]}
        if empty is not None:  # classifier-free guidance's negative: the empty prompt
            inputs["negative_prompt_embeds"] = [empty["cap_feats"][empty["cap_mask"].bool()]] * len(conds)
        return inputs

    # --- images and the denoiser -------------------------------------------------------------------------

    def shift_sigmas(self, sigmas: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return dynamic_shift(self.noise_scheduler, sigmas, latent_shape[-2] * latent_shape[-1] // 4)

    def predict(self, denoiser, noisy, timesteps, cond, batch):
        frames = list(noisy.unsqueeze(2).unbind(0))  # B x (C, 1, h, w)
        captions = [c.to(noisy.dtype) for c in self.captions(cond)]
        t = (1000 - timesteps.to(noisy.dtype)) / 1000  # the transformer counts time from noise (0) to image (1)
        out = denoiser(frames, t, captions, return_dict=False)[0]
        return -torch.stack(out).squeeze(2)  # it predicts x0 - eps; the flow objective's velocity is eps - x0
