"""Model families, one module each, and the one detection that training and generation share.

`detect(model)` reads the pipeline's `model_index.json` (and, where needed, a component config) and returns the
`Family` subclass whose `matches` accepts it; the user never names the family. To add a family, add a module with
a `Family` subclass and list it in `FAMILIES` (more specific first).
"""

from __future__ import annotations

from difftune.pipelines.families.base import Family, read_model_index, sub_config
from difftune.pipelines.families.chroma import Chroma
from difftune.pipelines.families.flux import Flux
from difftune.pipelines.families.flux2 import Flux2, Flux2Klein
from difftune.pipelines.families.flux_kontext import FluxKontext
from difftune.pipelines.families.qwen_image import QwenImage
from difftune.pipelines.families.qwen_image_edit import QwenImageEdit, QwenImageEditPlus
from difftune.pipelines.families.sd import StableDiffusion1, StableDiffusion2
from difftune.pipelines.families.sd3 import StableDiffusion3
from difftune.pipelines.families.sdxl import StableDiffusionXL
from difftune.pipelines.families.z_image import ZImage

FAMILIES: tuple[type[Family], ...] = (
    StableDiffusionXL, StableDiffusion2, StableDiffusion1, StableDiffusion3, Flux, FluxKontext, QwenImage, QwenImageEdit,
    QwenImageEditPlus, Flux2,
    Flux2Klein, ZImage, Chroma,
)  # fmt: skip

__all__ = ["FAMILIES", "Family", "by_name", "detect", "read_model_index", "sub_config"]


def detect(model: str, index: dict | None = None) -> type[Family]:
    """The family of the pipeline at `model` (a folder or Hub id); a one-line `UserError` if none fits."""
    from difftune.core.errors import UserError

    index = index if index is not None else read_model_index(model)
    for family in FAMILIES:
        if family.matches(index, model):
            return family
    names = ", ".join(dict.fromkeys(f.pipeline_class_name for f in FAMILIES[::-1]))
    raise UserError(f"{model} is a {index.get('_class_name', 'pipeline of unknown class')}; supported: {names}")


def by_name(name: str) -> type[Family]:
    return next(f for f in FAMILIES if f.name == name)
