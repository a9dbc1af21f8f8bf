"""Flux.2: `Flux2Pipeline` (dev: guidance-distilled, Mistral Small 3.1 text) and `Flux2KleinPipeline` (klein: Qwen3
text, no guidance input), a transformer of double- and single-stream blocks (`Flux2Transformer2DModel`) trained with
rectified flow on patchified VAE latents (Black Forest Labs 2025, "FLUX.2").

As the pipelines build it: dev puts each caption after BFL's system message in Mistral's chat format
(`format_input`, the processor's chat template), klein in Qwen3's chat format with thinking turned off; both pad to
`--max_sequence_length` tokens (512 by default, the pipelines'), run the LLM with its attention mask, and stack three
intermediate hidden layers on features (dev 10, 20, 30; klein 9, 18, 27) into the text stream, every padded position
included (the transformer takes no text mask), with (0, 0, 0, position) ids. The VAE's latents (B, C, h, w) are
patchified 2x2 into (B, 4C, h/2, w/2) and normalised by the VAE's batch-norm statistics, then flattened into tokens
with (0, row, column, 0) ids; the timestep is t / 1000; dev also takes the guidance value (`--guidance_scale`, 4.0 by
default, the pipeline's). The pipelines' own static helpers (`_patchify_latents`, `_pack_latents`, the id builders)
do the reshaping. Training sigmas are moved by the resolution-dependent shift Flux.2 samples with (its empirical mu,
which also depends on the step count: taken at the pipelines' default 50 steps).

Where diffusers' `train_dreambooth_lora_flux2.py` / `_flux2_klein.py` differ, and why:
- Their training sigmas are unshifted (the scheduler enables dynamic shifting, so its training sigmas are); here
  they follow the pipeline's shift, so training spends its steps where sampling does.
- Their dev script's default guidance is 3.5, copied from its Flux.1 script; the Flux.2 pipeline samples at 4.0.
- Their LoRA targets are the attention projections and the single blocks' fused projections; here the feed-forward
  layers of the double blocks too (`--target_modules` narrows them).
As they do, latents are the posterior mean, and the LLM is never trained (`--train_text_encoder` is refused). The
real dev ships a `PixtralProcessor` as its tokenizer; only its chat template is used.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from difftune.core.errors import UserError
from difftune.pipelines.families.base import Family

ATTENTION = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
             "attn.add_v_proj", "attn.to_add_out")  # fmt: skip
FEED_FORWARD = ("ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out")
SINGLE = ("attn.to_qkv_mlp_proj",)  # a single block's fused q, k, v and feed-forward input
DEFAULT_GUIDANCE = 4.0  # Flux2Pipeline.__call__'s
SHIFT_STEPS = 50  # the step count the training shift's empirical mu is taken at: the pipelines' default


class Flux2(Family):
    name: ClassVar[str] = "flux2"
    pipeline_class_name: ClassVar[str] = "Flux2Pipeline"
    denoiser_name: ClassVar[str] = "transformer"
    objective: ClassVar[str] = "flow"
    default_sampler: ClassVar[str] = "flow-euler"
    passes_sigmas: ClassVar[bool] = True
    flow_sigmas_set_own: ClassVar[bool] = True
    text_first: ClassVar[bool] = True
    sample_posterior: ClassVar[bool] = False
    takes_negative_prompt: ClassVar[bool] = False
    adaptable_text_encoders: ClassVar[tuple[str, ...]] = ()
    lora_targets: ClassVar[tuple[str, ...]] = (*ATTENTION, *FEED_FORWARD, *SINGLE)
    hidden_layers: ClassVar[tuple[int, ...]] = (10, 20, 30)
    default_max_sequence_length: ClassVar[int] = 512

    @classmethod
    def matches(cls, index: dict, model: str) -> bool:
        return index.get("_class_name") == cls.pipeline_class_name

    @classmethod
    def load_noise_scheduler(cls, model: str, **options):
        from diffusers import FlowMatchEulerDiscreteScheduler

        return FlowMatchEulerDiscreteScheduler.from_pretrained(model, subfolder="scheduler")

    @classmethod
    def guidance_inputs(cls, scale: float, negative_prompts: list[str] | None, count: int) -> dict:
        """dev: the guidance the transformer is conditioned on; klein: classifier-free guidance against the empty
        prompt. Neither pipeline takes a negative prompt."""
        return {"guidance_scale": scale}

    @classmethod
    def helpers(cls):
        """The pipeline class, whose static methods patchify, pack and index latents and text."""
        return cls.pipeline_class()

    def sampling_scheduler(self):
        return type(self.noise_scheduler).from_config(self.noise_scheduler.config)

    def check_options(self) -> None:
        if self.options.get("guidance_scale") is not None and not self.guided():
            raise UserError(
                f"--guidance_scale: {self.model} has no guidance embeddings (not Flux.2 dev); drop the flag"
            )

    def guided(self) -> bool:
        return bool(self.denoiser.config.get("guidance_embeds", False))

    def default_lora_targets(self) -> list[str]:
        # A single block's output projection is `attn.to_out`, which in a double block names a ModuleList.
        singles = [
            f"single_transformer_blocks.{i}.attn.to_out" for i in range(len(self.denoiser.single_transformer_blocks))
        ]
        return [*self.lora_targets, *singles]

    # --- text ------------------------------------------------------------------------------------------

    def max_sequence_length(self) -> int:
        return self.options.get("max_sequence_length") or self.default_max_sequence_length

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        from diffusers.pipelines.flux2.pipeline_flux2 import format_input
        from diffusers.pipelines.flux2.system_messages import SYSTEM_MESSAGE

        tokens = self.parts["tokenizer"].apply_chat_template(
            format_input(captions, system_message=SYSTEM_MESSAGE), add_generation_prompt=False, tokenize=True,
            return_dict=True, return_tensors="pt", padding="max_length", truncation=True,
            max_length=self.max_sequence_length(),
        )  # fmt: skip
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    def encode_text(self, ids, encoders=None) -> dict:
        encoder = (encoders or self.text_encoders())["text_encoder"]
        device = next(encoder.parameters()).device
        out = encoder(input_ids=ids["input_ids"].to(device), attention_mask=ids["attention_mask"].to(device),
                      output_hidden_states=True, use_cache=False)  # fmt: skip
        layers = torch.stack([out.hidden_states[k] for k in self.hidden_layers], dim=2)  # (B, L, 3, D)
        return {"encoder_hidden_states": layers.flatten(2)}  # (B, L, 3D): layer-major features per token

    def text_cache_tag(self) -> str:
        return f"{self.name}-layers{self.hidden_layers}:{self.max_sequence_length()}"

    def embedding_inputs(self, conds: list[dict], empty: dict | None) -> dict:
        return {"prompt_embeds": torch.stack([c["encoder_hidden_states"] for c in conds])}

    # --- images and the denoiser -------------------------------------------------------------------------

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) -> patchified (B, 4C, h/2, w/2), normalised by the VAE's batch-norm statistics."""
        patches = self.helpers()._patchify_latents(z)
        bn = self.vae.bn
        mean = bn.running_mean.view(1, -1, 1, 1).to(patches)
        std = torch.sqrt(bn.running_var.view(1, -1, 1, 1) + self.vae.config.batch_norm_eps).to(patches)
        return (patches - mean) / std

    def shift_sigmas(self, sigmas: torch.Tensor, latent_shape: tuple[int, ...]) -> torch.Tensor:
        from diffusers.pipelines.flux2.pipeline_flux2 import compute_empirical_mu

        if not self.noise_scheduler.config.get("use_dynamic_shifting", False):
            return sigmas
        mu = compute_empirical_mu(image_seq_len=latent_shape[-2] * latent_shape[-1], num_steps=SHIFT_STEPS)
        return self.noise_scheduler.time_shift(mu, 1.0, sigmas)

    def predict(self, denoiser, noisy, timesteps, cond, batch):
        pipe = self.helpers()
        b, c, h, w = noisy.shape  # patchified latents
        text = cond["encoder_hidden_states"].to(noisy.dtype)
        guidance = None
        if self.guided():
            value = self.options.get("guidance_scale") or DEFAULT_GUIDANCE
            guidance = torch.full((b,), float(value), device=noisy.device, dtype=torch.float32)
        out = denoiser(
            hidden_states=pipe._pack_latents(noisy), timestep=timesteps.to(noisy.dtype) / 1000, guidance=guidance,
            encoder_hidden_states=text, txt_ids=pipe._prepare_text_ids(text).to(noisy.device),
            img_ids=pipe._prepare_latent_ids(noisy).to(noisy.device), return_dict=False,
        )[0]  # (B, h * w, C), row-major tokens  # fmt: skip
        return out.transpose(1, 2).reshape(b, c, h, w)


class Flux2Klein(Flux2):
    name: ClassVar[str] = "flux2_klein"
    pipeline_class_name: ClassVar[str] = "Flux2KleinPipeline"
    hidden_layers: ClassVar[tuple[int, ...]] = (9, 18, 27)

    def pipeline_extras(self) -> dict:
        return {"is_distilled": bool(self.index.get("is_distilled", False))}

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        tokenizer = self.parts["tokenizer"]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                               add_generation_prompt=True, enable_thinking=False) for c in captions]  # fmt: skip
        tokens = tokenizer(texts, return_tensors="pt", padding="max_length", truncation=True,
                           max_length=self.max_sequence_length())  # fmt: skip
        return {"input_ids": tokens.input_ids, "attention_mask": tokens.attention_mask}

    def embedding_inputs(self, conds: list[dict], empty: dict | None) -> dict:
        inputs = super().embedding_inputs(conds, empty)
        if empty is not None:  # the negative of klein's classifier-free guidance is the empty prompt
            inputs["negative_prompt_embeds"] = empty["encoder_hidden_states"].expand(len(conds), -1, -1)
        return inputs
