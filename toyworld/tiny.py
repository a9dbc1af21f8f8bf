"""Tiny pipelines of every supported family, built locally from configs: nothing is ever downloaded.

`build_pipeline` / `save_tiny_pipeline` make SD 1.x, 2.x (v-prediction) and SDXL pipelines from the components of
`toyworld.tiny_parts` (the project's CLIP tokenizer, which knows every shapes word, `purple` included; UNet, VAE,
text encoders and scheduler at a named size: ``test`` is tens of thousands of parameters for unit tests, ``base``
the embedded `pipelines/tiny_shapes` model), and hand the flow-matching families (SD 3/3.5, Flux) to
`toyworld.tiny_flow`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

from difftune.toyworld.tiny_flow import build_flow_pipeline
from difftune.toyworld.tiny_parts import (
    SIZES,
    load_clip_tokenizer,
    sd_scheduler,
    tiny_text_encoder,
    tiny_unet,
    tiny_vae,
)

UNET_FAMILIES = ("sd1", "sd2", "sdxl")
FLOW_FAMILIES = ("sd3", "sd35", "flux", "flux-schnell", "flux-kontext")


def build_pipeline(
    size: str = "test",
    family: str = "sd1",
    tokenizer_dir: str | Path | None = None,
    seed: int = 0,
    t5: bool = True,
) -> DiffusionPipeline:
    """A randomly initialised tiny pipeline of `family`.

    Families: ``sd1``, ``sd2`` (v-prediction), ``sdxl``, and the flow-matching ``sd3``, ``sd35``, ``flux``
    (guidance-distilled, like Flux.1-dev), ``flux-schnell`` and the edit model ``flux-kontext`` (see
    `toyworld.tiny_flow`). `tokenizer_dir` is where
    the CLIP tokenizer is read from, or written to when absent. `t5=False` leaves out SD 3's T5 encoder.
    """
    if family not in UNET_FAMILIES + FLOW_FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(UNET_FAMILIES + FLOW_FAMILIES)}")
    if not t5 and family not in ("sd3", "sd35"):
        raise ValueError(f"t5=False is only for sd3 and sd35 (their T5 encoder is optional), not {family!r}")
    if family in FLOW_FAMILIES:
        # Imported here because tiny_flow builds on this module's helpers.
        return build_flow_pipeline(size, family, load_clip_tokenizer(tokenizer_dir), seed=seed, t5=t5)
    spec = SIZES[size]
    torch.manual_seed(seed)
    tokenizer = load_clip_tokenizer(tokenizer_dir)
    vocab_size = len(tokenizer.get_vocab())
    scheduler = sd_scheduler("v_prediction" if family == "sd2" else "epsilon")
    vae = tiny_vae(spec)
    if family == "sdxl":
        text_encoder = tiny_text_encoder(spec, vocab_size)
        text_encoder_2 = tiny_text_encoder(spec, vocab_size, projection=True)
        unet = tiny_unet(spec, cross_attention_dim=2 * spec.text_hidden, sdxl=True)
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=text_encoder,
            text_encoder_2=text_encoder_2,
            tokenizer=tokenizer,
            tokenizer_2=tokenizer,
            unet=unet,
            scheduler=scheduler,
        )
    text_encoder = tiny_text_encoder(spec, vocab_size)
    unet = tiny_unet(spec, cross_attention_dim=spec.text_hidden)
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def save_tiny_pipeline(
    out_dir: str | Path, size: str = "test", family: str = "sd1", seed: int = 0, t5: bool = True
) -> Path:
    """Builds a tiny pipeline and saves it as a diffusers folder (safetensors); returns the folder."""
    out = Path(out_dir)
    pipe = build_pipeline(size, family, tokenizer_dir=out / "tokenizer", seed=seed, t5=t5)
    pipe.save_pretrained(out)
    return out
