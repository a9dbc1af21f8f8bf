"""Tiny flow-matching pipelines (Stable Diffusion 3/3.5, Flux.1) built locally from configs: nothing is downloaded.

`write_t5_tokenizer` writes a T5 tokenizer (a SentencePiece-style Unigram model built with the `tokenizers`
library): one "▁word" piece per word of the project's vocabulary, single characters as a fallback, `<pad>` = 0,
`</s>` = 1 appended to every text, `<unk>` = 2. `build_flow_pipeline` makes, at a named size:

- ``sd3``: `StableDiffusion3Pipeline` as in "Scaling Rectified Flow Transformers for High-Resolution Image
  Synthesis" (Esser et al., 2024): an MMDiT (`SD3Transformer2DModel`), two CLIP encoders with projections whose
  pooled outputs are concatenated, an optional T5 encoder, a VAE with a latent shift, and the shift-3 flow-matching
  Euler scheduler SD 3 ships.
- ``sd35``: SD 3.5's MMDiT-X changes on top: QK RMS-norm and a second self-attention in the first block(s).
- ``flux`` / ``flux-schnell``: `FluxPipeline` as Black Forest Labs' Flux.1-dev (guidance-distilled: the guidance
  scale is a transformer input) and Flux.1-schnell (timestep-distilled, no guidance input): a double- then
  single-stream transformer over 2x2-packed latents with 3-axis RoPE, CLIP's pooled output, T5's sequence, and the
  scheduler config each ships (dev: resolution-dependent "dynamic" shift; schnell: no shift).
- ``flux-kontext``: `FluxKontextPipeline` (Flux.1 Kontext dev, an edit model): Flux.1-dev's components, the input
  image's latents appended to the noisy ones as tokens of image index 1.

Sizes: ``test`` (tens of thousands of parameters, 32-64 px on CPU) and ``base`` (a ~2M-parameter transformer for
an embedded flow model trained on the 64x64 shapes world: 16x16x4 latents, 8x8 patches). The CLIP encoders and the
VAE are `toyworld.tiny`'s at the same size name. The pipelines' default T5 length is 256 (SD 3) or 512 (Flux)
tokens; pass ``max_sequence_length=MAX_LENGTH`` to keep tiny runs fast.
"""

from __future__ import annotations

import string
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    FluxKontextPipeline,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from tokenizers import Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import Unigram
from transformers import CLIPTokenizer, T5Config, T5EncoderModel, T5TokenizerFast

from difftune.toyworld.tiny_parts import MAX_LENGTH, SIZES, WORDS, tiny_text_encoder, tiny_vae

# Log-probabilities of the Unigram pieces: a whole word (-1) always beats spelling it out ("▁" -3, then -5 a letter).
WORD_SCORE, SPACE_SCORE, CHAR_SCORE = -1.0, -3.0, -5.0
FALLBACK_CHARS = string.ascii_letters + string.digits + string.punctuation


def write_t5_tokenizer(out_dir: str | Path, words: tuple[str, ...] = WORDS, max_length: int = MAX_LENGTH) -> Path:
    """Writes a T5 tokenizer folder (`tokenizer.json` + config) and returns its path. Deterministic.

    Loads with `T5TokenizerFast.from_pretrained`. Characters outside ASCII letters, digits and punctuation become
    `<unk>`, so any text tokenizes."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("▁" + word, WORD_SCORE) for word in dict.fromkeys(words)]
    vocab += [("▁", SPACE_SCORE)] + [(char, CHAR_SCORE) for char in FALLBACK_CHARS]
    tokenizer = Tokenizer(Unigram(vocab, unk_id=2, byte_fallback=False))
    # SentencePiece's convention, as T5's own tokenizer: split on whitespace, mark each word's start with "▁".
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    tokenizer.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    # No sentinel <extra_id_*> tokens: they are for T5's span-corruption pretraining, which nothing here does.
    wrapped = T5TokenizerFast(tokenizer_object=tokenizer, extra_ids=0, model_max_length=max_length)
    wrapped.save_pretrained(out)
    return out


@dataclass(frozen=True)
class FlowSize:
    """Sizes of a tiny flow pipeline. `parts` names the `toyworld.tiny.SIZES` entry for the CLIP encoders and VAE.

    `layers` are SD 3's joint blocks or Flux's double-stream blocks; `single_layers` are Flux's single-stream ones.
    `sample_size` is SD 3's default latent side; `rope_axes` (Flux) split the head dim over (text, y, x)."""

    parts: str
    layers: int
    single_layers: int
    heads: int
    head_dim: int
    t5_hidden: int
    t5_layers: int
    t5_heads: int
    sample_size: int
    rope_axes: tuple[int, int, int]


FLOW_SIZES: dict[str, FlowSize] = {
    # Tens of thousands of parameters: unit tests on CPU at 32-64 px (latents x2 smaller).
    "test": FlowSize("test", 2, 1, 2, 8, 32, 1, 2, 32, (2, 2, 4)),
    # The embedded flow base: 64x64 images, 16x16x4 latents; about 2M transformer parameters (inner dim 128).
    "base": FlowSize("base", 4, 4, 4, 32, 128, 2, 4, 16, (8, 12, 12)),
}

# Latent statistics the released VAEs ship: SD 3 / 3.5 and Flux.1 (a random tiny VAE has its own, unmeasured).
SD3_VAE = dict(scaling_factor=1.5305, shift_factor=0.0609, quant_conv=False)
FLUX_VAE = dict(scaling_factor=0.3611, shift_factor=0.1159, quant_conv=False)


def tiny_t5(size: FlowSize, vocab_size: int) -> T5EncoderModel:
    """A T5 v1.1-style encoder (gated-GELU feed-forward, untied embeddings), as SD 3 and Flux use."""
    config = T5Config(
        vocab_size=vocab_size,
        d_model=size.t5_hidden,
        d_kv=size.t5_hidden // size.t5_heads,
        d_ff=2 * size.t5_hidden,
        num_layers=size.t5_layers,
        num_heads=size.t5_heads,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        tie_word_embeddings=False,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return T5EncoderModel(config)


def load_t5_tokenizer() -> T5TokenizerFast:
    """The project's T5 tokenizer, written to a temporary folder and read back (it is cheap and deterministic)."""
    with tempfile.TemporaryDirectory(prefix="difftune-t5-") as tmp:
        return T5TokenizerFast.from_pretrained(write_t5_tokenizer(tmp))


def sd3_transformer(size: FlowSize, family: str) -> SD3Transformer2DModel:
    clip_hidden = SIZES[size.parts].text_hidden
    inner = size.heads * size.head_dim
    sd35 = dict(dual_attention_layers=(0,), qk_norm="rms_norm") if family == "sd35" else {}
    return SD3Transformer2DModel(
        sample_size=size.sample_size,
        patch_size=2,
        in_channels=SIZES[size.parts].latent_channels,
        out_channels=SIZES[size.parts].latent_channels,
        num_layers=size.layers,
        attention_head_dim=size.head_dim,
        num_attention_heads=size.heads,
        joint_attention_dim=size.t5_hidden,  # CLIP features (2 x clip_hidden) are zero-padded up to T5's width
        caption_projection_dim=inner,  # the text stream runs at the image stream's width
        pooled_projection_dim=2 * clip_hidden,  # the two CLIP projections, concatenated
        pos_embed_max_size=size.sample_size,  # patches per side: up to 2x the default (sample_size / patch 2)
        **sd35,
    )


def sd3_pipeline(size: FlowSize, family: str, tokenizer: CLIPTokenizer, t5: bool) -> StableDiffusion3Pipeline:
    if 2 * SIZES[size.parts].text_hidden > size.t5_hidden:
        raise ValueError("SD 3 pads the two CLIP features up to T5's width: t5_hidden must be >= 2 * text_hidden")
    parts = SIZES[size.parts]
    vocab_size = len(tokenizer.get_vocab())
    transformer = sd3_transformer(size, family)
    text_encoder = tiny_text_encoder(parts, vocab_size, projection=True)
    text_encoder_2 = tiny_text_encoder(parts, vocab_size, projection=True)
    tokenizer_3 = load_t5_tokenizer() if t5 else None
    text_encoder_3 = tiny_t5(size, len(tokenizer_3)) if t5 else None
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=tiny_vae(parts, **SD3_VAE),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer,
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )


def flux_scheduler(schnell: bool) -> FlowMatchEulerDiscreteScheduler:
    """The scheduler configs Flux.1 ships: dev shifts by image token count (mu from 0.5 at 256 tokens to 1.15 at
    4096), schnell does not shift at all."""
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0 if schnell else 3.0,
        use_dynamic_shifting=not schnell,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def flux_pipeline(size: FlowSize, family: str, tokenizer: CLIPTokenizer) -> FluxPipeline | FluxKontextPipeline:
    parts = SIZES[size.parts]
    if sum(size.rope_axes) != size.head_dim or any(axis % 2 for axis in size.rope_axes):
        raise ValueError(f"rope_axes {size.rope_axes} must be even and sum to head_dim {size.head_dim}")
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * parts.latent_channels,  # latents are packed 2x2: (B, C, H, W) -> (B, H/2 * W/2, 4C)
        num_layers=size.layers,
        num_single_layers=size.single_layers,
        attention_head_dim=size.head_dim,
        num_attention_heads=size.heads,
        joint_attention_dim=size.t5_hidden,
        pooled_projection_dim=parts.text_hidden,  # CLIPTextModel's pooled output
        guidance_embeds=family in ("flux", "flux-kontext"),
        axes_dims_rope=size.rope_axes,
    )
    text_encoder = tiny_text_encoder(parts, len(tokenizer.get_vocab()))
    tokenizer_2 = load_t5_tokenizer()
    text_encoder_2 = tiny_t5(size, len(tokenizer_2))
    pipeline_class = FluxKontextPipeline if family == "flux-kontext" else FluxPipeline
    return pipeline_class(
        scheduler=flux_scheduler(schnell=family == "flux-schnell"),
        vae=tiny_vae(parts, **FLUX_VAE),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )


def build_flow_pipeline(
    size: str, family: str, tokenizer: CLIPTokenizer, seed: int = 0, t5: bool = True
) -> StableDiffusion3Pipeline | FluxPipeline | FluxKontextPipeline:
    """A randomly initialised tiny ``sd3``, ``sd35``, ``flux``, ``flux-schnell`` or ``flux-kontext`` pipeline with
    `tokenizer` as its CLIP tokenizer(s). `t5=False` (SD 3 only) leaves out text_encoder_3 / tokenizer_3; SD 3 then
    feeds zeros. Such a saved folder loads with ``StableDiffusion3Pipeline.from_pretrained(folder,
    text_encoder_3=None, tokenizer_3=None)``: diffusers records them as [null, null] but does not count them
    optional."""
    if size not in FLOW_SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(FLOW_SIZES)}")
    spec = FLOW_SIZES[size]
    torch.manual_seed(seed)
    if family in ("sd3", "sd35"):
        return sd3_pipeline(spec, family, tokenizer, t5)
    if family in ("flux", "flux-schnell", "flux-kontext"):
        if not t5:
            raise ValueError("Flux cannot run without its T5 encoder")
        return flux_pipeline(spec, family, tokenizer)
    raise ValueError(f"unknown flow family {family!r}; choose sd3, sd35, flux, flux-schnell or flux-kontext")
