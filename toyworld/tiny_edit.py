"""The tiny edit model of the shapes world: a `FluxKontextPipeline` (Flux.1 Kontext's architecture, Black Forest
Labs 2025) small enough to train from scratch on a CPU, built around parts an embedded base already ships.

`build_edit_pipeline(parts_from, size)` takes the VAE (with the shift and scale that normalise its latents) and the
CLIP text encoder and tokenizer of a shipped pipeline folder (`pipelines/tiny_flow_shapes`), and adds a fresh T5
encoder with the project's T5 tokenizer (which also knows the instruction words) and a fresh Flux transformer: a
64x64 image is 16x16x4 latents, 64 packed tokens, and its input image 64 more. The scheduler is Flux.1-dev's
(resolution-dependent shift). No guidance embedding: the pipeline's `guidance_scale` is then ignored, so any value
a caller passes gives the model it was trained as.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxKontextPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast
from transformers.utils import logging as transformers_logging

from difftune.toyworld.tiny_flow import flux_scheduler, write_t5_tokenizer
from difftune.toyworld.tiny_parts import WORDS

EDIT_WORDS = (*WORDS, "make", "it")
T5_LENGTH = 8  # tokens per instruction ("make it yellow" and </s> are 4)


@dataclass(frozen=True)
class EditSize:
    layers: int  # double-stream blocks
    single_layers: int
    heads: int
    head_dim: int
    rope_axes: tuple[int, int, int]  # (index, row, column): they split the head dim
    t5_hidden: int
    t5_layers: int


EDIT_SIZES = {
    "test": EditSize(1, 1, 2, 8, (2, 2, 4), 16, 1),
    # The embedded edit base: about 1.8M transformer parameters (inner width 128).
    "base": EditSize(2, 2, 4, 32, (8, 12, 12), 32, 1),
}


def tiny_t5(size: EditSize, vocab_size: int) -> T5EncoderModel:
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=size.t5_hidden,
            d_kv=size.t5_hidden // 2,
            d_ff=2 * size.t5_hidden,
            num_layers=size.t5_layers,
            num_heads=2,
            relative_attention_num_buckets=8,
            relative_attention_max_distance=16,
            feed_forward_proj="gated-gelu",
            tie_word_embeddings=False,
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )  # fmt: skip
    )


def build_edit_pipeline(parts_from: str | Path, size: str = "base", seed: int = 0, work_dir: str | Path | None = None):
    """A fresh tiny `FluxKontextPipeline` around the VAE and CLIP of the pipeline folder `parts_from`; the T5
    tokenizer is written to `work_dir/tokenizer_2` (a temporary folder when None). Deterministic for a seed."""
    import tempfile

    spec = EDIT_SIZES[size]
    parts = Path(parts_from)
    vae = AutoencoderKL.from_pretrained(parts / "vae")
    tokenizer = CLIPTokenizer.from_pretrained(parts / "tokenizer")
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # its load report lists the unused projection, dropped on purpose
    try:
        text_encoder = CLIPTextModel.from_pretrained(parts / "text_encoder")  # CLIP's pooled output, unprojected
    finally:
        transformers_logging.set_verbosity(verbosity)
    with tempfile.TemporaryDirectory(prefix="difftune-t5-") as tmp:
        folder = Path(work_dir or tmp) / "tokenizer_2"
        tokenizer_2 = T5TokenizerFast.from_pretrained(write_t5_tokenizer(folder, EDIT_WORDS, T5_LENGTH))
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * vae.config.latent_channels,  # 2x2-packed latents
        num_layers=spec.layers,
        num_single_layers=spec.single_layers,
        attention_head_dim=spec.head_dim,
        num_attention_heads=spec.heads,
        joint_attention_dim=spec.t5_hidden,
        pooled_projection_dim=text_encoder.config.hidden_size,
        guidance_embeds=False,
        axes_dims_rope=spec.rope_axes,
    )
    return FluxKontextPipeline(
        scheduler=flux_scheduler(schnell=False),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=tiny_t5(spec, len(tokenizer_2)),
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
