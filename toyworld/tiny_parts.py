"""The tiny components every toy pipeline is built from: the project's CLIP tokenizer (`write_tokenizer`), and
UNet, VAE, CLIP text encoder and scheduler builders at a named size (`SIZES`: ``test`` is tens of thousands of
parameters for unit tests, ``base`` the embedded model). `toyworld.tiny` assembles SD 1.x/2.x/SDXL pipelines from
them and `toyworld.tiny_flow` the SD 3/Flux ones; this module imports neither, so they import it without a cycle.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from diffusers import (
    AutoencoderKL,
    PNDMScheduler,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from difftune.toyworld.shapes import COLOURS, SHAPES

WORDS: tuple[str, ...] = (
    *COLOURS, *SHAPES,
    "a", "an", "the", "of", "in", "on", "and", "with", "photo", "picture", "image", "drawing", "style",
    "orange", "pink", "black", "white", "gray", "brown", "cyan", "small", "large", "big", "left", "right",
    "top", "bottom", "center", "sks", "dog", "cat", "person", "object", "shape", "star", "heart", "background",
    "handwritten", "digit", "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)  # fmt: skip
MAX_LENGTH = 16  # tokens per prompt; the shapes world's prompts need 5


def write_tokenizer(out_dir: str | Path, words: tuple[str, ...] = WORDS, max_length: int = MAX_LENGTH) -> Path:
    """Writes a CLIP tokenizer folder and returns its path. Deterministic: the same words give the same files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    byte_chars = list(bytes_to_unicode().values())
    vocab_list = byte_chars + [c + "</w>" for c in byte_chars]
    merges: list[str] = []
    for word in words:
        # CLIP's BPE splits a word into characters with "</w>" on the last; merge them left to right.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            rule = f"{merged} {piece}"
            merged = merged + piece
            if rule not in merges:
                merges.append(rule)
                vocab_list.append(merged)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: i for i, token in enumerate(dict.fromkeys(vocab_list))}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(str(out / "vocab.json"), str(out / "merges.txt"), model_max_length=max_length)
    tokenizer.save_pretrained(out)
    return out


@dataclass(frozen=True)
class TinySize:
    """Sizes of the tiny components. `vae_blocks` sets the VAE's downsampling: 2 ** (len - 1)."""

    unet_blocks: tuple[int, ...]
    layers_per_block: int
    attention_head_dim: int
    norm_num_groups: int
    text_hidden: int
    text_layers: int
    text_heads: int
    vae_blocks: tuple[int, ...]
    vae_norm_groups: int
    latent_channels: int = 4


SIZES: dict[str, TinySize] = {
    # Tens of thousands of parameters: unit tests on CPU.
    "test": TinySize((8, 16), 1, 4, 4, 16, 2, 2, (8, 8), 4),
    # The embedded base: 64x64 images, 16x16x4 latents.
    "base": TinySize((32, 64, 64), 1, 8, 16, 64, 2, 4, (16, 32, 32), 8),
}


def tiny_unet(size: TinySize, cross_attention_dim: int, sdxl: bool = False) -> UNet2DConditionModel:
    n = len(size.unet_blocks)
    kwargs = {}
    if sdxl:
        # SDXL conditions on pooled text embeddings and six micro-conditioning numbers ("text_time").
        kwargs = dict(
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=size.text_hidden + 6 * 8,  # pooled text_encoder_2 + time ids
            use_linear_projection=True,
            transformer_layers_per_block=1,
        )
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=size.latent_channels,
        out_channels=size.latent_channels,
        block_out_channels=size.unet_blocks,
        layers_per_block=size.layers_per_block,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (n - 1) + ("UpBlock2D",),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=size.attention_head_dim,
        norm_num_groups=size.norm_num_groups,
        **kwargs,
    )


def tiny_vae(
    size: TinySize, scaling_factor: float = 0.18215, shift_factor: float | None = None, quant_conv: bool = True
) -> AutoencoderKL:
    """SD's KL autoencoder. SD 3 and Flux ship theirs with a latent shift and without the 1x1 quant convs."""
    n = len(size.vae_blocks)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=size.vae_blocks,
        layers_per_block=1,
        latent_channels=size.latent_channels,
        norm_num_groups=size.vae_norm_groups,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_conv,
        use_post_quant_conv=quant_conv,
    )


def tiny_text_encoder(size: TinySize, vocab_size: int, projection: bool = False) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=size.text_hidden,
        intermediate_size=4 * size.text_hidden,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=size.text_hidden,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)


def sd_scheduler(prediction_type: str = "epsilon", **overrides) -> PNDMScheduler:
    """The scheduler SD 1.5 ships: PNDM over scaled-linear betas 0.00085..0.012, 1000 training steps.

    Training builds a `DDPMScheduler` from this config; generation picks any sampler from it."""
    config = dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    config.update(overrides)
    return PNDMScheduler(**config)


def load_clip_tokenizer(tokenizer_dir: str | Path | None) -> CLIPTokenizer:
    """The project's CLIP tokenizer from `tokenizer_dir`, written there first if absent (if None: through a
    temporary folder that is removed once the tokenizer has read its files)."""
    if tokenizer_dir is None:
        import tempfile

        with tempfile.TemporaryDirectory(prefix="difftune-tok-") as tmp:
            return CLIPTokenizer.from_pretrained(write_tokenizer(tmp))
    tok_dir = Path(tokenizer_dir)
    if not (tok_dir / "vocab.json").exists():
        write_tokenizer(tok_dir)
    return CLIPTokenizer.from_pretrained(tok_dir)
