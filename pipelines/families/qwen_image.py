"""Qwen-Image: `QwenImagePipeline`, an MMDiT (`QwenImageTransformer2DModel`) trained with rectified flow on the
latents of a causal 3D VAE, conditioned on a Qwen2.5-VL language model (Wu et al. 2025, "Qwen-Image Technical
Report").

As the pipeline's `encode_prompt` builds it: each caption goes into the pipeline's own prompt template (a system
turn describing images, then the caption as the user turn), Qwen2.5-VL reads it with its attention mask, and its last
hidden layer at the valid tokens, minus the template's first 34 tokens, is the text stream (`encoder_hidden_states`,
at most `--max_sequence_length` tokens; 512 by default, the pipeline's), right-padded with zeros to the batch's
longest and masked (`encoder_hidden_states_mask`; None when nothing is padded, as the pipeline passes it). The
template and the number of tokens dropped are read from the installed pipeline class, not copied. Images go through
the VAE as one-frame videos (B, 3, 1, H, W); latents are normalised per channel by the VAE's `latents_mean` and
`latents_std`, packed 2x2 into tokens (`QwenImagePipeline._pack_latents`) with `img_shapes` (1, h/2, w/2), and the
timestep is given as t / 1000.

Training draws sigma as diffusers' scripts do, then moves it by the resolution-dependent shift the pipeline samples
with (mu from the image's token count between the scheduler's `base_shift` and `max_shift`; its `shift_terminal`
only rescales the inference grid and is not applied). Where diffusers' `train_dreambooth_lora_qwen_image.py`
differs, and why:
- It passes `shift=3.0` to a scheduler whose config enables dynamic shifting, which then ignores it: its training
  sigmas are unshifted. Here they follow the pipeline's shift, so training spends its steps where sampling does (as
  musubi-tuner's `qwen_shift`); `--timestep_sampling uniform` gives the unshifted uniform draw.
- Its default LoRA targets are the image stream's attention (`to_q/k/v/out.0`); here the text stream's attention
  and both streams' feed-forward layers too, as for SD 3 and Flux.1 (`--target_modules` narrows them).
- It encodes the text once per prompt and keeps the encoder in memory; here captions are encoded in a pass of their
  own before the transformer loads and the encoder is freed (`text_first`, `finetune.text_pass`).
The text encoder is never trained (`--train_text_encoder` is refused): a 7B LLM's LoRA is out of this scope.
"""

from __future__ import annotations

from functools import cache
from typing import ClassVar

import torch
from einops import rearrange

from difftune.core.errors import UserError
from difftune.pipelines.families.base import Family, dynamic_shift, pad_sequences

ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_add_out")  # fmt: skip
FEED_FORWARD = ("img_mlp.net.0.proj", "img_mlp.net.2", "txt_mlp.net.0.proj", "txt_mlp.net.2")


@cache
def prompt_template() -> tuple[str, int, int]:
    """QwenImagePipeline's prompt template, how many of its leading tokens it drops, and its longest text."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    return pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx, pipe.tokenizer_max_length


class QwenImage(Family):
    name: ClassVar[str] = "qwen_image"
    pipeline_class_name: ClassVar[str] = "QwenImagePipeline"
    denoiser_name: ClassVar[str] = "transformer"
    objective: ClassVar[str] = "flow"
    default_sampler: ClassVar[str] = "flow-euler"
    passes_sigmas: ClassVar[bool] = True
    text_first: ClassVar[bool] = True
    adaptable_text_encoders: ClassVar[tuple[str, ...]] = ()
    lora_targets: ClassVar[tuple[str, ...]] = (*ATTENTION, *FEED_FORWARD)
    default_max_sequence_length: ClassVar[int] = 512  # QwenImagePipeline.__call__'s

    @classmethod
    def matches(cls, index: dict, model: str) -> bool:
        return index.get("_class_name") == cls.pipeline_class_name

    @classmethod
    def load_noise_scheduler(cls, model: str, **options):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")

    @classmethod
    def guidance_inputs(cls, scale: float, negative_prompts: list[str] | None, count: int) -> dict:
        """QwenImagePipeline's classifier-free guidance is `true_cfg_scale`, on only with a negative prompt: " "
        when none is given (its own documentation's way to guide without one)."""
        if negative_prompts is None and scale > 1:
            negative_prompts = [" "] * count
        return {"true_cfg_scale": scale, "negative_prompt": negative_prompts}

    def sampling_scheduler(self):
        return type(self.noise_scheduler).from_config(self.noise_scheduler.config)

    @classmethod
    def check_settings(cls, model: str, index: dict, options: dict) -> None:
        cls.sequence_length(options.get("max_sequence_length"))

    def check_options(self) -> None:
        if self.denoiser.config.get("guidance_embeds", False):
            raise UserError(f"{self.model}: a guidance-distilled Qwen-Image transformer is not supported for training")

    @classmethod
    def sequence_length(cls, wanted: int | None) -> int:
        """Text tokens after the template: `wanted` (`--max_sequence_length`), else the pipeline's default; at most
        the pipeline's 1024."""
        wanted = wanted or cls.default_max_sequence_length
        limit = prompt_template()[2]
        if wanted > limit:
            raise UserError(f"--max_sequence_length {wanted} is beyond Qwen-Image's limit of {limit} text tokens")
        return wanted

    def max_sequence_length(self) -> int:
        return self.sequence_length(self.options.get("max_sequence_length"))

    # --- text ------------------------------------------------------------------------------------------

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """The captions in the pipeline's template, padded to the longest (B, L); the template's leading tokens and
        at most `max_sequence_length` caption tokens (the encoder is causal: what follows cannot change them)."""
        template, drop, _ = prompt_template()
        tokens = self.parts["tokenizer"](
            [template.format(c) for c in captions], max_length=self.max_sequence_length() + drop, padding=True,
            truncation=True, return_tensors="pt",
        )  # fmt: skip
        return {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}

    def encode_text(self, ids, encoders=None) -> dict:
        encoder = (encoders or self.text_encoders())["text_encoder"]
        device = next(encoder.parameters()).device
        mask = ids["attention_mask"].to(device)
        hidden = encoder(input_ids=ids["input_ids"].to(device), attention_mask=mask, output_hidden_states=True)
        last = hidden.hidden_states[-1]  # (B, L, D)
        drop = prompt_template()[1]
        # Each caption's valid tokens after the template, then right-padded to the batch's longest.
        valid = [h[m.bool()][drop : drop + self.max_sequence_length()] for h, m in zip(last, mask, strict=True)]
        masks = [torch.ones(len(v), dtype=torch.long, device=device) for v in valid]
        return {"encoder_hidden_states": pad_sequences(valid), "encoder_hidden_states_mask": pad_sequences(masks)}

    def text_cache_tag(self) -> str:
        return f"qwen-template:{self.max_sequence_length()}"

    def embedding_inputs(self, conds: list[dict], empty: dict | None) -> dict:
        embeds = pad_sequences([c["encoder_hidden_states"] for c in conds])
        mask = pad_sequences([c["encoder_hidden_states_mask"] for c in conds])
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    # --- images and the denoiser -------------------------------------------------------------------------

    def posterior(self, pixels: torch.Tensor) -> torch.Tensor:
        """One-frame videos (B, 3, 1, H, W) through the 3D VAE; the frame axis dropped again: (B, 2C, h, w)."""
        return self.vae.encode(pixels[:, :, None]).latent_dist.parameters[:, :, 0]

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.vae.config.latents_mean).view(1, -1, 1, 1).to(z)
        std = torch.tensor(self.vae.config.latents_std).view(1, -1, 1, 1).to(z)
        return (z - mean) / std

    def shift_sigmas(self, sigmas: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return dynamic_shift(self.noise_scheduler, sigmas, latent_shape[-2] * latent_shape[-1] // 4)

    def predict(self, denoiser, noisy, timesteps, cond, batch):
        b, c, h, w = noisy.shape
        tokens = rearrange(noisy, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)  # _pack_latents
        mask = cond["encoder_hidden_states_mask"].to(noisy.device)
        out = denoiser(
            hidden_states=tokens, timestep=timesteps.to(noisy.dtype) / 1000,
            encoder_hidden_states=cond["encoder_hidden_states"].to(noisy.dtype),
            encoder_hidden_states_mask=None if bool(mask.all()) else mask,
            img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False,
        )[0]  # fmt: skip
        return rearrange(out, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h // 2, w=w // 2, ph=2, pw=2)
