"""Randomly initialised pipelines of released models' exact shapes (SD 1.5, SDXL, SD 3.5 medium, Flux.1-dev, and
through `scripts.shaped_families` Qwen-Image, Flux.2 dev and klein 4B, Z-Image and Chroma), for
`scripts/benchmark_training.py`'s shaped rows: speed and memory do not depend on the weights."""

from __future__ import annotations

from pathlib import Path

from difftune.scripts.shaped_families import KINDS as FAMILY_KINDS
from difftune.scripts.shaped_families import PIPELINES as FAMILY_PIPELINES
from difftune.scripts.shaped_families import build_family_shaped, family_parts

# The real architectures of SD 1.5 and SDXL base (diffusers' configs), randomly initialised: speed and memory do not
# depend on the weights. Text encoders: CLIP ViT-L (both) and OpenCLIP ViT-bigG (SDXL's second); VAE: SD's.
UNET_SHAPES = {
    "sd15": dict(
        sample_size=64, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=768, attention_head_dim=8,
    ),
    "sdxl": dict(
        sample_size=128, layers_per_block=2, block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    ),
}  # fmt: skip
TEXT_SHAPES = {
    "clip-l": dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   projection_dim=768),
    "clip-g": dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   projection_dim=1280),
}  # fmt: skip
VAE_SHAPE = dict(
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)  # fmt: skip
# SD 3.5 medium's and Flux.1-dev's transformers (diffusers' configs of the released models), their 16-channel VAE
# and T5-XXL's width.
FLOW_SHAPES = {
    "sd35": dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
    ),
    "flux": dict(
        patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56),
    ),
}  # fmt: skip
FLOW_VAE = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
T5_SHAPE = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=2, num_heads=64, feed_forward_proj="gated-gelu")
SHAPED_RESOLUTION = {"sd15": 512, "sdxl": 1024, "sd35": 1024, "flux": 1024}
DEFAULT_SHAPED = tuple(SHAPED_RESOLUTION)  # what --shaped runs on CUDA unless told: the 2026 families are asked for
SHAPED_RESOLUTION |= dict.fromkeys(FAMILY_KINDS, 1024)


def build_shaped_pipeline(kind: str, folder: Path, overrides: dict) -> Path:
    """A randomly initialised pipeline of `kind`'s shapes saved as a diffusers folder; `overrides` (keys `unet`,
    `vae`, `text`, `transformer`, `t5`) narrow it for tests. The 2026 families are `scripts.shaped_families`'."""
    if kind in FAMILY_KINDS:
        return build_family_shaped(kind, folder, overrides)
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from difftune.toyworld.tiny_parts import sd_scheduler, write_tokenizer

    torch.manual_seed(0)
    tokenizer = CLIPTokenizer.from_pretrained(write_tokenizer(folder / "tokenizer", max_length=77))
    vocab = len(tokenizer.get_vocab())

    def text_encoder(shape: str, cls):
        ids = dict(vocab_size=vocab, max_position_embeddings=77, bos_token_id=vocab - 2, eos_token_id=vocab - 1,
                   pad_token_id=vocab - 1)  # fmt: skip
        return cls(CLIPTextConfig(**ids, **{**TEXT_SHAPES[shape], **overrides.get("text", {})}))

    if kind in FLOW_SHAPES:  # SD 3 reads CLIP-L's projection, Flux its pooled output
        clip_l = CLIPTextModelWithProjection if kind == "sd35" else CLIPTextModel
        parts = dict(text_encoder=text_encoder("clip-l", clip_l), tokenizer=tokenizer)
    else:
        parts = dict(
            unet=UNet2DConditionModel(**{**UNET_SHAPES[kind], **overrides.get("unet", {})}),
            vae=AutoencoderKL(**{**VAE_SHAPE, **overrides.get("vae", {})}),
            text_encoder=text_encoder("clip-l", CLIPTextModel), tokenizer=tokenizer, scheduler=sd_scheduler(),
        )  # fmt: skip
    if kind in FLOW_SHAPES:
        pipe = flow_pipeline(kind, parts, text_encoder, folder, overrides)
    elif kind == "sdxl":
        pipe = StableDiffusionXLPipeline(
            **parts, text_encoder_2=text_encoder("clip-g", CLIPTextModelWithProjection), tokenizer_2=tokenizer
        )
    else:
        pipe = StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
        )
    pipe.save_pretrained(folder)
    return folder


def flow_pipeline(kind: str, parts: dict, text_encoder, folder: Path, overrides: dict):
    """SD 3.5 medium or Flux.1-dev of the real transformer shapes, around `parts`' tokenizer and CLIP-L."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        FluxPipeline,
        FluxTransformer2DModel,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection, T5Config, T5EncoderModel, T5TokenizerFast

    from difftune.toyworld.tiny_flow import write_t5_tokenizer

    t5_tokenizer = T5TokenizerFast.from_pretrained(write_t5_tokenizer(folder / "tokenizer_t5", max_length=512))
    t5_config = {**T5_SHAPE, **overrides.get("t5", {})}
    t5 = T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), **t5_config, tie_word_embeddings=False))
    transformer_config = {**FLOW_SHAPES[kind], **overrides.get("transformer", {})}
    vae = AutoencoderKL(**{**VAE_SHAPE, **FLOW_VAE, **overrides.get("vae", {})})
    clip_l = parts["text_encoder"]
    if kind == "flux":
        scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                    max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)  # fmt: skip
        return FluxPipeline(transformer=FluxTransformer2DModel(**transformer_config), vae=vae, scheduler=scheduler,
                            text_encoder=clip_l, tokenizer=parts["tokenizer"], text_encoder_2=t5,
                            tokenizer_2=t5_tokenizer)  # fmt: skip
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**transformer_config), vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), text_encoder=clip_l, tokenizer=parts["tokenizer"],
        text_encoder_2=text_encoder("clip-g", CLIPTextModelWithProjection), tokenizer_2=parts["tokenizer"],
        text_encoder_3=t5, tokenizer_3=t5_tokenizer,
    )  # fmt: skip


# ----------------------------------------------------------------------------------------------- configs only

CLIP_IDS = dict(vocab_size=49408, max_position_embeddings=77)
T5_XXL = dict(T5_SHAPE, num_layers=24, vocab_size=32128)  # the released T5-XXL encoder (SD 3/3.5, Flux.1)
SHAPED_FAMILIES = ("sd15", "sdxl", "sd35", "flux", *FAMILY_KINDS)


def shaped_parts(kind: str, overrides: dict | None = None) -> dict:
    """`kind`'s pipeline (SD 1.5, SDXL, SD 3.5 medium, Flux.1-dev; Qwen-Image, Flux.2 dev and klein 4B, Z-Image
    and Chroma through `scripts.shaped_families.family_parts`) as its components' (library, class, config) by name,
    with the released models' shapes (T5-XXL at its full 24 layers, the LLM text encoders at full size);
    `overrides` (keys `unet`, `transformer`, `vae`, `text`, `t5`) narrow them. No module is built."""
    overrides = overrides or {}
    if kind in FAMILY_KINDS:
        return family_parts(kind, overrides)
    text = overrides.get("text", {})

    def clip(shape: str, cls: str) -> tuple:
        return ("transformers", cls, {**CLIP_IDS, **TEXT_SHAPES[shape], **text})

    t5 = ("transformers", "T5EncoderModel", {**T5_XXL, **overrides.get("t5", {})})
    if kind in FLOW_SHAPES:
        vae = ("diffusers", "AutoencoderKL", {**VAE_SHAPE, **FLOW_VAE, **overrides.get("vae", {})})
        transformer = {**FLOW_SHAPES[kind], **overrides.get("transformer", {})}
        if kind == "flux":
            return dict(
                transformer=("diffusers", "FluxTransformer2DModel", transformer), vae=vae,
                text_encoder=clip("clip-l", "CLIPTextModel"), text_encoder_2=t5,
                tokenizer=("transformers", "CLIPTokenizer", None), tokenizer_2=("transformers", "T5TokenizerFast", None),
                scheduler=("diffusers", "FlowMatchEulerDiscreteScheduler", dict(
                    shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                    max_image_seq_len=4096)),
            )  # fmt: skip
        return dict(
            transformer=("diffusers", "SD3Transformer2DModel", transformer), vae=vae,
            text_encoder=clip("clip-l", "CLIPTextModelWithProjection"),
            text_encoder_2=clip("clip-g", "CLIPTextModelWithProjection"), text_encoder_3=t5,
            tokenizer=("transformers", "CLIPTokenizer", None), tokenizer_2=("transformers", "CLIPTokenizer", None),
            tokenizer_3=("transformers", "T5TokenizerFast", None),
            scheduler=("diffusers", "FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
        )  # fmt: skip
    parts = dict(
        unet=("diffusers", "UNet2DConditionModel", {**UNET_SHAPES[kind], **overrides.get("unet", {})}),
        vae=("diffusers", "AutoencoderKL", {**VAE_SHAPE, **overrides.get("vae", {})}),
        text_encoder=clip("clip-l", "CLIPTextModel"), tokenizer=("transformers", "CLIPTokenizer", None),
        scheduler=("diffusers", "DDPMScheduler", dict(beta_schedule="scaled_linear", beta_start=0.00085,
                                                      beta_end=0.012, num_train_timesteps=1000)),
    )  # fmt: skip
    if kind == "sdxl":
        parts.update(text_encoder_2=clip("clip-g", "CLIPTextModelWithProjection"),
                     tokenizer_2=("transformers", "CLIPTokenizer", None))  # fmt: skip
    return parts


PIPELINES = {"sd15": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
             "sd35": "StableDiffusion3Pipeline", "flux": "FluxPipeline", **FAMILY_PIPELINES}  # fmt: skip
TOKEN_LIMITS = {"CLIPTokenizer": 77, "T5TokenizerFast": 512}  # the LLMs' tokenizers: 131,072 (their configs')


def write_shaped_configs(kind: str, folder: Path, overrides: dict | None = None) -> Path:
    """A pipeline folder of `kind` holding configs only (`model_index.json`, `<part>/config.json`, the scheduler's):
    what the memory planner reads. No weights, nothing built."""
    import json

    import diffusers
    import transformers

    folder.mkdir(parents=True, exist_ok=True)
    index = {"_class_name": PIPELINES[kind], "_diffusers_version": diffusers.__version__}
    for name, (library, cls_name, config) in shaped_parts(kind, overrides).items():
        index[name] = [library, cls_name]
        (folder / name).mkdir(exist_ok=True)
        if config is None:  # a tokenizer: the planner reads its length limit only
            limit = TOKEN_LIMITS.get(cls_name, 131072)
            (folder / name / "tokenizer_config.json").write_text(json.dumps({"model_max_length": limit}))
            continue
        if library == "transformers":
            cls = getattr(transformers, cls_name)
            config = cls.config_class(**config).to_dict()
        filename = "scheduler_config.json" if name == "scheduler" else "config.json"
        (folder / name / filename).write_text(json.dumps({"_class_name": cls_name, **config}, indent=1))
    (folder / "model_index.json").write_text(json.dumps(index, indent=1))
    return folder
