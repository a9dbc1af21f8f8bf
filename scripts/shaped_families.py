"""Randomly initialised pipelines of the 2026 families' released shapes (Qwen-Image, Flux.2 dev, Flux.2 klein 4B,
Z-Image, Chroma), for `scripts/benchmark_training.py`'s shaped rows: speed and memory do not depend on the weights.

The transformers and VAEs are the released models' configs (diffusers' conversion scripts and model configs), built
in bf16. The LLM text encoders are built at the width the transformer reads, with the layers the pipeline reads
hidden states from, but one attention head and a narrow feed-forward layer: with the text cache (as in any run) they
only fill it before the timed steps and are freed before the transformer loads (`finetune.text_pass`), so their
depth and width beyond what the transformer sees change no figure of the table. The tokenizers are the project's
(`toyworld.tiny_llm`, `toyworld.tiny_flow`).

`family_parts` gives the same pipelines as configs only, with the text encoders at their released size (Qwen2.5-VL
7B, Mistral Small 3.1 24B, Qwen3-4B, T5-XXL): what the memory planner and the hardware presets' predictions read
(`scripts.shaped_models.write_shaped_configs`). The released config.json files were not fetched (no network): the
LLMs' values are those their model cards and transformers' docs state, and each component's parameter count is
tested against the published one (tests/finetune/test_shaped_plans.py).
"""

from __future__ import annotations

from pathlib import Path

# The released transformers (Flux.2's from diffusers' scripts/convert_flux2_to_diffusers.py).
TRANSFORMERS = {
    "qwen_image": dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
                       num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56)),
    "flux2": dict(in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128, num_attention_heads=48,
                  joint_attention_dim=15360, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), guidance_embeds=True),
    "flux2_klein": dict(in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
                        num_attention_heads=24, joint_attention_dim=7680, mlp_ratio=3.0,
                        axes_dims_rope=(32, 32, 32, 32), guidance_embeds=False),
    "z_image": dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30,
                    n_refiner_layers=2, n_heads=30, n_kv_heads=30, cap_feat_dim=2560, axes_dims=[32, 48, 48],
                    axes_lens=[1024, 512, 512]),
    "chroma": dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                   joint_attention_dim=4096, axes_dims_rope=(16, 56, 56), approximator_num_channels=64,
                   approximator_hidden_dim=5120, approximator_layers=5),
}  # fmt: skip
# Text encoders: (width the transformer reads, layers the pipeline needs); Chroma's T5 is scripts.shaped_models'.
TEXT = {"qwen_image": (3584, 2), "flux2": (5120, 31), "flux2_klein": (2560, 28), "z_image": (2560, 2)}
FLUX_VAE = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.3611,
                shift_factor=0.1159, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)  # fmt: skip
KINDS = tuple(TRANSFORMERS)


def text_encoder(kind: str, tokenizer, overrides: dict):
    """The LLM a family reads, at the transformer's width and with the layers its pipeline indexes."""
    from difftune.toyworld.tiny_llm import tiny_mistral3, tiny_qwen3, tiny_qwen25_vl

    width, layers = TEXT[kind]
    width, layers = overrides.get("width", width), overrides.get("layers", layers)
    if kind == "qwen_image":
        return tiny_qwen25_vl(tokenizer, width, layers)
    if kind == "flux2":
        return tiny_mistral3(tokenizer, width, layers)
    return tiny_qwen3(tokenizer, width, layers, causal_lm=kind == "flux2_klein")


def build_family_shaped(kind: str, folder: Path, overrides: dict) -> Path:
    """A pipeline of `kind`'s released shapes (random weights, bf16) saved as a diffusers folder; `overrides` (keys
    `transformer`, `vae`, `text`) narrow it for tests."""
    import diffusers
    import torch

    from difftune.toyworld.tiny_families import chroma_scheduler, flux2_scheduler, qwen_image_scheduler
    from difftune.toyworld.tiny_flow import write_t5_tokenizer
    from difftune.toyworld.tiny_llm import load_llm_tokenizer

    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # the released weights' precision: half the memory and disk of fp32
    try:
        transformer_class = {"qwen_image": "QwenImageTransformer2DModel", "flux2": "Flux2Transformer2DModel",
                             "flux2_klein": "Flux2Transformer2DModel", "z_image": "ZImageTransformer2DModel",
                             "chroma": "ChromaTransformer2DModel"}[kind]  # fmt: skip
        transformer = getattr(diffusers, transformer_class)(
            **{**TRANSFORMERS[kind], **overrides.get("transformer", {})}
        )
        parts = dict(transformer=transformer, vae=_vae(kind, overrides.get("vae", {})))
        if kind == "chroma":
            from transformers import T5Config, T5EncoderModel, T5TokenizerFast

            from difftune.scripts.shaped_models import T5_SHAPE

            tokenizer = T5TokenizerFast.from_pretrained(write_t5_tokenizer(folder / "tokenizer_t5", max_length=512))
            config = T5Config(vocab_size=len(tokenizer), **{**T5_SHAPE, **overrides.get("t5", {})},
                              tie_word_embeddings=False)  # fmt: skip
            parts.update(text_encoder=T5EncoderModel(config), tokenizer=tokenizer, scheduler=chroma_scheduler())
            return _save(diffusers.ChromaPipeline(**parts), folder)
        tokenizer = load_llm_tokenizer("mistral" if kind == "flux2" else "qwen")
        parts.update(text_encoder=text_encoder(kind, tokenizer, overrides.get("text", {})), tokenizer=tokenizer)
        if kind == "z_image":
            with torch.no_grad():  # torch.empty at construction
                transformer.x_pad_token.normal_()
                transformer.cap_pad_token.normal_()
            scheduler = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
            return _save(diffusers.ZImagePipeline(**parts, scheduler=scheduler), folder)
        if kind == "qwen_image":
            return _save(diffusers.QwenImagePipeline(**parts, scheduler=qwen_image_scheduler()), folder)
        pipeline = diffusers.Flux2Pipeline if kind == "flux2" else diffusers.Flux2KleinPipeline
        return _save(pipeline(**parts, scheduler=flux2_scheduler()), folder)
    finally:
        torch.set_default_dtype(previous)


def _vae(kind: str, overrides: dict):
    import diffusers

    if kind == "qwen_image":
        return diffusers.AutoencoderKLQwenImage(**overrides)  # the defaults are the released VAE
    if kind.startswith("flux2"):
        return diffusers.AutoencoderKLFlux2(**overrides)
    return diffusers.AutoencoderKL(**{**FLUX_VAE, **overrides})


def _save(pipe, folder: Path) -> Path:
    pipe.save_pretrained(folder)
    return folder


# ----------------------------------------------------------------------------------------------- configs only

# The released LLM text encoders at full size, as their config.json files give them (transformers' classes read
# them): Qwen2.5-VL-7B-Instruct (Qwen-Image's `text_encoder`, vision tower included: the pipeline's class holds it),
# Mistral Small 3.1/3.2 24B (Flux.2 dev's; the two releases share the shape, and transformers' `Mistral3Config`
# defaults are that shape), Qwen3-4B (Flux.2 klein 4B's `Qwen3ForCausalLM`, its output layer tied to the
# embeddings; Z-Image's `Qwen3Model`, without one).
QWEN25_VL_7B = dict(
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000,
                     rms_norm_eps=1e-6, rope_theta=1e6, rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                       fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu"),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    tie_word_embeddings=False,
)  # fmt: skip
MISTRAL_SMALL_24B = dict(
    text_config=dict(model_type="mistral", vocab_size=131072, hidden_size=5120, intermediate_size=32768,
                     num_hidden_layers=40, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=1e9, sliding_window=None),
    vision_config=dict(model_type="pixtral", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, head_dim=64, patch_size=14, image_size=1540),
    image_token_index=10, spatial_merge_size=2, multimodal_projector_bias=False, tie_word_embeddings=False,
)  # fmt: skip
QWEN3_4B = dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True)  # fmt: skip
# (pipeline class, text encoder class, its config, tokenizer class) of each family with an LLM text encoder.
LLM_PIPELINES = {
    "qwen_image": ("QwenImagePipeline", "Qwen2_5_VLForConditionalGeneration", QWEN25_VL_7B, "Qwen2Tokenizer"),
    "flux2": ("Flux2Pipeline", "Mistral3ForConditionalGeneration", MISTRAL_SMALL_24B, "PixtralProcessor"),
    "flux2_klein": ("Flux2KleinPipeline", "Qwen3ForCausalLM", QWEN3_4B, "Qwen2TokenizerFast"),
    "z_image": ("ZImagePipeline", "Qwen3Model", QWEN3_4B, "Qwen2Tokenizer"),
}
PIPELINES = {kind: entry[0] for kind, entry in LLM_PIPELINES.items()} | {"chroma": "ChromaPipeline"}
TRANSFORMER_CLASSES = {"qwen_image": "QwenImageTransformer2DModel", "flux2": "Flux2Transformer2DModel",
                       "flux2_klein": "Flux2Transformer2DModel", "z_image": "ZImageTransformer2DModel",
                       "chroma": "ChromaTransformer2DModel"}  # fmt: skip
VAE_CLASSES = {
    "qwen_image": "AutoencoderKLQwenImage",
    "flux2": "AutoencoderKLFlux2",
    "flux2_klein": "AutoencoderKLFlux2",
}


def scheduler_config(kind: str) -> dict:
    """The scheduler_config.json each release ships (`toyworld.tiny_families` keeps them)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from difftune.toyworld.tiny_families import chroma_scheduler, flux2_scheduler, qwen_image_scheduler

    if kind == "z_image":  # Z-Image-Turbo's: a static shift of 3
        return dict(FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0).config)
    make = {"qwen_image": qwen_image_scheduler, "chroma": chroma_scheduler}.get(kind, flux2_scheduler)
    return dict(make().config)


def family_parts(kind: str, overrides: dict) -> dict:
    """`kind`'s pipeline as its components' (library, class, config) by name, at the released shapes (text encoders
    at full size); `overrides` (keys `transformer`, `vae`, `text`: the LLM's `text_config` or Qwen3's own keys,
    `t5`: Chroma's T5) narrow them. No module is built."""
    transformer = ("diffusers", TRANSFORMER_CLASSES[kind], {**TRANSFORMERS[kind], **overrides.get("transformer", {})})
    vae = {**({} if kind in VAE_CLASSES else FLUX_VAE), **overrides.get("vae", {})}  # the VAE classes' defaults
    parts = dict(
        transformer=transformer, vae=("diffusers", VAE_CLASSES.get(kind, "AutoencoderKL"), vae),
        scheduler=("diffusers", "FlowMatchEulerDiscreteScheduler", scheduler_config(kind)),
    )  # fmt: skip
    if kind == "chroma":
        from difftune.scripts.shaped_models import T5_XXL

        t5 = {**T5_XXL, **overrides.get("t5", {})}
        return parts | dict(text_encoder=("transformers", "T5EncoderModel", t5),
                            tokenizer=("transformers", "T5TokenizerFast", None))  # fmt: skip
    _, encoder, config, tokenizer = LLM_PIPELINES[kind]
    text = overrides.get("text", {})
    if "text_config" in config:
        config = {**config, "text_config": {**config["text_config"], **text}}
    else:
        config = {**config, **text}
    return parts | dict(text_encoder=("transformers", encoder, config), tokenizer=("transformers", tokenizer, None))
