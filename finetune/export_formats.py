"""Per model family, the formats `finetune.export` writes its results in, as data: the model card's tags, the key
layout of diffusers' LoRA file, and whether and how a kohya/ComfyUI LoRA file (`--output_kohya_format`) is written.

A family is looked up by its `name`; a family without an entry here is a `LookupError` naming this module, so a new
family module comes with its entry (a test checks every detected family has one).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch

from difftune.core.errors import UserError
from difftune.finetune.adapters import ADAPTER_NAME
from difftune.finetune.kohya_flux import FLUX2, flux_kohya_layers
from difftune.finetune.lora_keys import kohya_layers

if TYPE_CHECKING:
    from difftune.pipelines.families import Family


@dataclass(frozen=True)
class KohyaFormat:
    """How a family's kohya file names its adapters: the denoiser's keys, and the text encoders' key prefixes."""

    denoiser_layers: Callable[[torch.nn.Module], dict[str, torch.Tensor]]  # the denoiser's adapter in kohya keys
    # Text encoder -> its prefix in the file; diffusers' converter writes `lora_te1`/`lora_te2` (SDXL's convention).
    text_prefixes: Mapping[str, str]


@dataclass(frozen=True)
class ExportFormat:
    card_tags: tuple[str, ...]  # the model card's tags, before the ones every card carries
    # diffusers' file in `convert_state_dict_to_diffusers`'s keys, which UNet families' diffusers scripts write;
    # otherwise peft's keys, as transformer families' scripts save them.
    legacy_lora_keys: bool
    kohya: KohyaFormat | None  # None: no kohya file, ComfyUI loads the family's LoRAs in diffusers' format


# The denoiser's kohya keys: a UNet's `lora_unet_*` through diffusers' converter, a Flux transformer's in BFL's fused
# layout, as ComfyUI loads it.
UNET_KOHYA = partial(kohya_layers, prefix="unet")
FLUX_KOHYA = partial(flux_kohya_layers, adapter=ADAPTER_NAME)
FLUX2_KOHYA = partial(flux_kohya_layers, adapter=ADAPTER_NAME, layout=FLUX2)

SD = ExportFormat(
    card_tags=("stable-diffusion",),
    legacy_lora_keys=True,
    kohya=KohyaFormat(UNET_KOHYA, text_prefixes={"text_encoder": "lora_te"}),
)
QWEN_EDIT_TAGS = ("qwen-image", "qwen-image-edit", "image-to-image")
FORMATS: dict[str, ExportFormat] = {
    "sd1": SD,
    "sd2": SD,
    "sdxl": ExportFormat(
        card_tags=("stable-diffusion", "stable-diffusion-xl"),
        legacy_lora_keys=True,
        kohya=KohyaFormat(UNET_KOHYA, text_prefixes={"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}),
    ),
    "sd3": ExportFormat(card_tags=("stable-diffusion-3", "sd3"), legacy_lora_keys=False, kohya=None),
    "flux": ExportFormat(
        card_tags=("flux", "flux-diffusers"),
        legacy_lora_keys=False,
        kohya=KohyaFormat(FLUX_KOHYA, text_prefixes={"text_encoder": "lora_te1"}),
    ),
    # ComfyUI maps Qwen-Image and Z-Image LoRAs in diffusers' keys onto its own modules: no second file.
    "qwen_image": ExportFormat(card_tags=("qwen-image",), legacy_lora_keys=False, kohya=None),
    "qwen-image-edit": ExportFormat(card_tags=QWEN_EDIT_TAGS, legacy_lora_keys=False, kohya=None),
    "qwen-image-edit-plus": ExportFormat(card_tags=QWEN_EDIT_TAGS, legacy_lora_keys=False, kohya=None),
    "z_image": ExportFormat(card_tags=("z-image",), legacy_lora_keys=False, kohya=None),
    # ComfyUI's Flux.2 loads BFL's names only for Flux.2's feed-forward and single-block linears.
    "flux2": ExportFormat(card_tags=("flux2",), legacy_lora_keys=False, kohya=KohyaFormat(FLUX2_KOHYA, {})),
    "flux2_klein": ExportFormat(
        card_tags=("flux2", "flux2-klein"), legacy_lora_keys=False, kohya=KohyaFormat(FLUX2_KOHYA, {})
    ),  # fmt: skip
    # Chroma's blocks are Flux.1's: ComfyUI loads either layout, A1111-style tools BFL's.
    "chroma": ExportFormat(card_tags=("chroma",), legacy_lora_keys=False, kohya=KohyaFormat(FLUX_KOHYA, {})),
    # Kontext's transformer is Flux.1's: its LoRAs load in ComfyUI in the same BFL layout.
    "flux-kontext": ExportFormat(
        card_tags=("flux", "flux-kontext", "image-to-image"),
        legacy_lora_keys=False,
        kohya=KohyaFormat(FLUX_KOHYA, text_prefixes={"text_encoder": "lora_te1"}),
    ),
}


def export_format(family: type[Family]) -> ExportFormat:
    """The formats `family`'s results are written in."""
    if family.name not in FORMATS:
        raise LookupError(f"no export format for the {family.name!r} family: add its entry to {__name__}.FORMATS")
    return FORMATS[family.name]


def kohya_format(family: type[Family]) -> KohyaFormat:
    """`family`'s kohya file format; a `UserError` for a family that has none."""
    kohya = export_format(family).kohya
    if kohya is None:
        written = ", ".join(name for name, fmt in FORMATS.items() if fmt.kohya is not None)
        raise UserError(
            f"--output_kohya_format is not written for {family.name} models (only {written}); drop it: ComfyUI "
            "loads this family's LoRAs in diffusers' format"
        )
    return kohya
