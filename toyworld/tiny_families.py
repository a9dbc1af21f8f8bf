"""Tiny pipelines of the 2026 families, built with plain diffusers from constructor arguments: nothing is downloaded.

`build_family_pipeline(family)` makes, with random weights, one of
- ``qwen_image``: `QwenImagePipeline` (Qwen-Image, Wu et al. 2025): an MMDiT over 2x2-packed latents of a causal 3D
  VAE (`AutoencoderKLQwenImage`, one frame, per-channel latent mean/std), conditioned on a Qwen2.5-VL's last hidden
  layer with its attention mask;
- ``qwen-image-edit`` / ``qwen-image-edit-plus``: `QwenImageEditPipeline` / `QwenImageEditPlusPipeline`
  (Qwen-Image-Edit, and its Plus version taking several input images): Qwen-Image's parts with a VAE that
  downsamples x8 as the released one does (the pipelines size input images to about a megapixel, 64x64 tokens
  here), and a `Qwen2VLProcessor` whose image processor reads every input image as 4x4 patches of 14 pixels (four
  image tokens after the 2x2 merge), built without torchvision (`core.processors`);
- ``flux2`` / ``flux2_klein``: `Flux2Pipeline` (Flux.2 dev: guidance-distilled, Mistral Small 3.1 text) and
  `Flux2KleinPipeline` (Flux.2 klein: Qwen3 text, no guidance input): `Flux2Transformer2DModel` over patchified,
  batch-norm-normalised latents of `AutoencoderKLFlux2`, text from three stacked hidden layers;
- ``z_image``: `ZImagePipeline` (Z-Image): a single-stream DiT (`ZImageTransformer2DModel`) over Flux-style VAE
  latents, Qwen3's penultimate hidden layer with padding dropped, a static shift-3 scheduler as Z-Image-Turbo ships;
- ``chroma``: `ChromaPipeline` (Chroma): Flux.1-schnell's architecture with the modulation layers replaced by a
  small approximator network, T5 text with an attention mask, no CLIP.

The scheduler configs are the released models' (Qwen-Image's resolution-dependent shift with a terminal sigma,
Flux.2's dynamic shift, Z-Image-Turbo's static shift 3, Chroma's Flux.1-dev one). Widths are 16-32, one or two
blocks; the LLM encoders of Flux.2 have the 31 (dev) and 28 (klein) layers their pipelines read hidden states from,
at width 16. `sample_kwargs(family)` are the pipeline call's arguments that keep tiny runs
fast and deterministic (a short text length; no classifier-free guidance).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKLFlux2,
    AutoencoderKLQwenImage,
    ChromaPipeline,
    ChromaTransformer2DModel,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    QwenImageEditPipeline,
    QwenImageEditPlusPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)
from einops import rearrange
from transformers import Qwen2VLImageProcessorPil, T5TokenizerFast

from difftune.core.processors import qwen_vl_processor
from difftune.toyworld.tiny_flow import FLOW_SIZES, FLUX_VAE, flux_scheduler, tiny_t5, write_t5_tokenizer
from difftune.toyworld.tiny_llm import load_llm_tokenizer, tiny_mistral3, tiny_qwen3, tiny_qwen25_vl
from difftune.toyworld.tiny_parts import SIZES, tiny_vae

FAMILIES = ("qwen_image", "flux2", "flux2_klein", "z_image", "chroma")
EDIT_FAMILIES = ("qwen-image-edit", "qwen-image-edit-plus")  # edit models: their pipelines take input images
TEXT_WIDTH = 16  # the tiny LLMs' hidden size
LATENT_CHANNELS = 4
TEST_MAX_SEQUENCE_LENGTH = 48  # text tokens per caption in tests: cheap, and more than any test caption needs


# Per family: the pipeline call's arguments that turn classifier-free guidance off (one transformer call a step).
NO_GUIDANCE: dict[str, dict] = {
    "qwen_image": {"true_cfg_scale": 1.0},
    "qwen-image-edit": {"true_cfg_scale": 1.0},
    "qwen-image-edit-plus": {"true_cfg_scale": 1.0},
    "flux2": {},  # guidance-distilled: the guidance value is an input, not a second call
    "flux2_klein": {"guidance_scale": 1.0},
    "z_image": {"guidance_scale": 0.0},
    "chroma": {"guidance_scale": 1.0},
}


def sample_kwargs(family: str) -> dict:
    """Arguments of `family`'s pipeline call for tiny test runs: a short text length and no classifier-free
    guidance."""
    return {"max_sequence_length": TEST_MAX_SEQUENCE_LENGTH, **NO_GUIDANCE[family]}


def _generator_normal(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def tiny_qwen_image_transformer() -> QwenImageTransformer2DModel:
    """Qwen-Image's MMDiT, two layers narrow (the edit pipelines share it: their control tokens are more of its input)."""
    channels = LATENT_CHANNELS
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=4 * channels, out_channels=channels, num_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=TEXT_WIDTH, axes_dims_rope=(8, 4, 4),
    )  # fmt: skip


def qwen_image_pipeline() -> QwenImagePipeline:
    tokenizer = load_llm_tokenizer("qwen")
    channels = LATENT_CHANNELS
    transformer = tiny_qwen_image_transformer()
    # The released VAE's per-channel latent statistics normalise its latents; tiny ones are non-trivial on purpose.
    vae = AutoencoderKLQwenImage(
        base_dim=8, z_dim=channels, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
        latents_mean=[0.1 * i for i in range(channels)], latents_std=[1.0 + 0.2 * i for i in range(channels)],
    )  # fmt: skip
    return QwenImagePipeline(scheduler=qwen_image_scheduler(), vae=vae, tokenizer=tokenizer, transformer=transformer,
                             text_encoder=tiny_qwen25_vl(tokenizer, TEXT_WIDTH))  # fmt: skip


def qwen_image_edit_pipeline(plus: bool) -> QwenImageEditPipeline | QwenImageEditPlusPipeline:
    tokenizer = load_llm_tokenizer("qwen_vl")
    channels = LATENT_CHANNELS
    transformer = tiny_qwen_image_transformer()
    vae = AutoencoderKLQwenImage(
        base_dim=4, z_dim=channels, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True],
        latents_mean=[0.1 * i for i in range(channels)], latents_std=[1.0 + 0.2 * i for i in range(channels)],
    )  # fmt: skip
    side = 14 * 4  # 4x4 patches of every image, whatever its size
    images = Qwen2VLImageProcessorPil(min_pixels=side * side, max_pixels=side * side)
    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    return cls(scheduler=qwen_image_scheduler(), vae=vae, tokenizer=tokenizer, transformer=transformer,
               processor=qwen_vl_processor(images, tokenizer),
               text_encoder=tiny_qwen25_vl(tokenizer, TEXT_WIDTH))  # fmt: skip


def qwen_image_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Qwen-Image's scheduler_config.json: shift by image size (0.5 at 256 tokens to 0.9 at 8192), terminal 0.02."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
        base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02, time_shift_type="exponential",
    )  # fmt: skip


def flux2_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Flux.2's scheduler_config.json: dynamic shifting (the pipeline computes an empirical mu from size and steps)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def chroma_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Chroma's: Flux.1-dev's resolution-dependent shift."""
    return flux_scheduler(schnell=False)


def flux2_vae() -> AutoencoderKLFlux2:
    vae = AutoencoderKLFlux2(
        sample_size=32, block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1, latent_channels=LATENT_CHANNELS,
        norm_num_groups=4, use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    # The released VAE's batch-norm statistics normalise the patchified latents; tiny ones are non-trivial.
    with torch.no_grad():
        vae.bn.running_mean.copy_(0.1 * _generator_normal(vae.bn.running_mean.shape, 1))
        vae.bn.running_var.copy_(1.0 + 0.5 * _generator_normal(vae.bn.running_var.shape, 2).abs())
    return vae


def flux2_pipeline(klein: bool) -> Flux2Pipeline | Flux2KleinPipeline:
    transformer = Flux2Transformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=3 * TEXT_WIDTH, timestep_guidance_channels=256,
        axes_dims_rope=(4, 4, 4, 4), guidance_embeds=not klein,
    )  # text: three hidden layers stacked on features  # fmt: skip
    scheduler = flux2_scheduler()
    if klein:
        tokenizer = load_llm_tokenizer("qwen")
        return Flux2KleinPipeline(scheduler=scheduler, vae=flux2_vae(), tokenizer=tokenizer, transformer=transformer,
                                  text_encoder=tiny_qwen3(tokenizer, TEXT_WIDTH, layers=28, causal_lm=True))  # fmt: skip
    tokenizer = load_llm_tokenizer("mistral")
    return Flux2Pipeline(scheduler=scheduler, vae=flux2_vae(), tokenizer=tokenizer, transformer=transformer,
                         text_encoder=tiny_mistral3(tokenizer, TEXT_WIDTH, layers=31))  # fmt: skip


def z_image_pipeline() -> ZImagePipeline:
    tokenizer = load_llm_tokenizer("qwen")
    transformer = ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=LATENT_CHANNELS, dim=32, n_layers=1,
        n_refiner_layers=1, n_heads=2, n_kv_heads=2, qk_norm=True, cap_feat_dim=TEXT_WIDTH, axes_dims=[8, 4, 4],
        axes_lens=[1024, 64, 64],
    )  # fmt: skip
    with torch.no_grad():  # the padding tokens start as torch.empty: give them values
        transformer.x_pad_token.copy_(_generator_normal(transformer.x_pad_token.shape, 3))
        transformer.cap_pad_token.copy_(_generator_normal(transformer.cap_pad_token.shape, 4))
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),  # Z-Image-Turbo's
        vae=tiny_vae(SIZES["test"], **FLUX_VAE), text_encoder=tiny_qwen3(tokenizer, TEXT_WIDTH), tokenizer=tokenizer,
        transformer=transformer,
    )  # fmt: skip


def chroma_pipeline() -> ChromaPipeline:
    size = FLOW_SIZES["test"]
    with tempfile.TemporaryDirectory(prefix="difftune-t5-") as tmp:  # ChromaPipeline pads T5's text to 512 tokens
        tokenizer = T5TokenizerFast.from_pretrained(write_t5_tokenizer(tmp, max_length=512))
    transformer = ChromaTransformer2DModel(
        patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=size.t5_hidden, axes_dims_rope=(4, 4, 8),
        approximator_num_channels=16, approximator_hidden_dim=32, approximator_layers=1,
    )  # fmt: skip
    return ChromaPipeline(
        scheduler=chroma_scheduler(), vae=tiny_vae(SIZES["test"], **FLUX_VAE),
        text_encoder=tiny_t5(size, len(tokenizer)).eval(), tokenizer=tokenizer, transformer=transformer,
    )  # fmt: skip


BUILDERS = {
    "qwen_image": qwen_image_pipeline,
    "qwen-image-edit": lambda: qwen_image_edit_pipeline(plus=False),
    "qwen-image-edit-plus": lambda: qwen_image_edit_pipeline(plus=True),
    "flux2": lambda: flux2_pipeline(klein=False),
    "flux2_klein": lambda: flux2_pipeline(klein=True),
    "z_image": z_image_pipeline,
    "chroma": chroma_pipeline,
}


def build_family_pipeline(family: str, seed: int = 0) -> DiffusionPipeline:
    """A randomly initialised tiny pipeline of `family` (one of `FAMILIES` or `EDIT_FAMILIES`)."""
    if family not in BUILDERS:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(BUILDERS)}")
    torch.manual_seed(seed)
    return BUILDERS[family]()


def unpack_latents(family: str, latents: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A pipeline's latents (`output_type="latent"`: packed tokens for Qwen-Image, Flux.2 and Chroma) in the family's
    training layout `shape` (B, C, h, w), the layout `Family.latents` gives an image in."""
    if latents.ndim == 4:  # Z-Image's
        return latents
    if family.startswith("flux2"):  # row-major tokens of the patchified latents
        return latents.transpose(1, 2).reshape(shape)
    h, w = shape[-2] // 2, shape[-1] // 2  # 2x2-packed (Qwen-Image's and Chroma's `_pack_latents`)
    return rearrange(latents, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h, w=w, ph=2, pw=2)


def save_family_pipeline(out_dir: str | Path, family: str, seed: int = 0) -> Path:
    """Builds a tiny `family` pipeline and saves it as a diffusers folder (safetensors); returns the folder."""
    out = Path(out_dir)
    build_family_pipeline(family, seed).save_pretrained(out)
    return out
