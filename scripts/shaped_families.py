"""Randomly initialised pipelines of the 2026 families' released shapes (Qwen-Image, Flux.2 dev, Flux.2 klein 4B,
Z-Image, Chroma), for `scripts/benchmark_training.py`'s shaped rows: speed and memory do not depend on the weights.

The transformers and VAEs are the released models' configs (diffusers' conversion scripts and model configs), built
in bf16. The LLM text encoders are built at the width the transformer reads, with the layers the pipeline reads
hidden states from, but one attention head and a narrow feed-forward layer: with the text cache (as in any run) they
only fill it before the timed steps and are freed before the transformer loads (`finetune.text_pass`), so their
depth and width beyond what the transformer sees change no figure of the table. The tokenizers are the project's
(`toyworld.tiny_llm`, `toyworld.tiny_flow`).
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
