"""Loading a Stable Diffusion pipeline (folder or Hub id) and LoRA adapters onto it, with one-line errors.

The family is read from `model_index.json`: `StableDiffusionXLPipeline` is ``sdxl``; a `StableDiffusionPipeline`
is ``sd2`` when its scheduler predicts ``v_prediction`` or its UNet cross-attends to 1024-wide text (OpenCLIP
ViT-H, SD 2.x base), else ``sd1``. LoRA files are loaded by diffusers' `load_lora_weights`, which reads the
diffusers/peft key format (`unet.`/`text_encoder.` + `lora_A`/`lora_B`) and converts kohya files
(`lora_unet_*`, `lora_te_*`, `.lora_down`/`.lora_up`/`.alpha`) itself; each adapter gets a name and a scale.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

from core.errors import UserError

FAMILIES = ("sd1", "sd2", "sdxl")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_WEIGHT_NAMES = ("pytorch_lora_weights.safetensors", "pytorch_lora_weights_kohya.safetensors")


def read_model_index(model: str) -> dict:
    """`model_index.json` of a local folder or a Hub id (the Hub only when the id is not a local path)."""
    path = Path(model)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise UserError(f"{model} is a folder but not a diffusers pipeline (no model_index.json)")
        return json.loads(index.read_text())
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise UserError(f"model {model!r} not found: give a diffusers pipeline folder or a Hub id like org/name")
    try:
        return dict(DiffusionPipeline.load_config(model))
    except Exception as err:  # noqa: BLE001 - hub errors come in many classes; all mean "cannot get this model"
        raise UserError(
            f"model {model!r} not found locally and could not be fetched from the Hub ({type(err).__name__})"
        ) from err


def _sub_config(model: str, sub: str, name: str) -> dict:
    path = Path(model) / sub / name
    if path.is_file():
        return json.loads(path.read_text())
    if Path(model).is_dir():
        return {}
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(model, f"{sub}/{name}")).read_text())
    except Exception:  # noqa: BLE001 - family detection falls back to sd1 without the file
        return {}


def detect_family(model: str, index: dict | None = None) -> str:
    index = index if index is not None else read_model_index(model)
    cls = index.get("_class_name", "")
    if "XL" in cls:
        return "sdxl"
    if cls not in ("StableDiffusionPipeline", ""):
        raise UserError(f"{model} is a {cls}; only Stable Diffusion 1.x, 2.x and SDXL pipelines are supported")
    scheduler = _sub_config(model, "scheduler", "scheduler_config.json")
    unet = _sub_config(model, "unet", "config.json")
    if scheduler.get("prediction_type") == "v_prediction" or unet.get("cross_attention_dim") == 1024:
        return "sd2"
    return "sd1"


def load_pipeline(
    model: str, dtype: str = "fp32", device: str = "cpu"
) -> tuple[StableDiffusionPipeline | StableDiffusionXLPipeline, str]:
    """The pipeline at `model` on `device` in `dtype`, and its family. No safety checker is loaded."""
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    index = read_model_index(model)
    family = detect_family(model, index)
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    kwargs = {} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}
    bars = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # loading a local pipeline takes a second: no bars to clutter stderr
    transformers_logging.disable_progress_bar()
    try:
        pipe = cls.from_pretrained(model, dtype=DTYPES[dtype], **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"could not load the pipeline at {model}: {str(err).splitlines()[0]}") from err
    finally:
        if bars[0]:
            diffusers_logging.enable_progress_bar()
        if bars[1]:
            transformers_logging.enable_progress_bar()
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)  # generate.py shows one bar over images instead
    return pipe, family


def resolve_lora_file(lora: str) -> Path:
    """A LoRA file path: the file itself, or the weights file inside a training output folder."""
    path = Path(lora)
    if path.is_file():
        return path
    if path.is_dir():
        for name in LORA_WEIGHT_NAMES:
            if (path / name).is_file():
                return path / name
        found = sorted(path.glob("*.safetensors"))
        if len(found) == 1:
            return found[0]
        raise UserError(f"no LoRA weights in {lora}: expected {LORA_WEIGHT_NAMES[0]} or a single .safetensors file")
    raise UserError(f"LoRA {lora!r} not found")


@dataclass(frozen=True)
class Adapter:
    path: str
    scale: float
    name: str


def load_loras(pipe: DiffusionPipeline, loras: list[str], scales: list[float], fuse: bool = False) -> list[Adapter]:
    """Loads each LoRA as a named adapter, activates them all with their scales, and optionally fuses them.

    A LoRA that does not fit the model (made for another family or size) is one `UserError` line."""
    if not loras:
        if len(scales) > 1:
            raise UserError("--lora_scale given more than once but no --lora")
        return []
    if len(scales) == 1:
        scales = scales * len(loras)
    if len(scales) != len(loras):
        raise UserError(f"{len(loras)} --lora but {len(scales)} --lora_scale: give one scale, or one per LoRA")
    adapters = []
    for i, lora in enumerate(loras):
        path = resolve_lora_file(lora)
        name = f"lora{i}"
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity(diffusers_logging.CRITICAL)  # its multi-line log would repeat our error
        try:
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
        except (RuntimeError, ValueError, KeyError, AttributeError) as err:
            raise UserError(f"LoRA {lora} does not fit this model: {_first_line(err)}") from err
        finally:
            diffusers_logging.set_verbosity(verbosity)
        loaded = {n for names in pipe.get_list_adapters().values() for n in names}
        if name not in loaded:
            raise UserError(f"LoRA {lora} does not fit this model: none of its keys name a module of this model")
        adapters.append(Adapter(str(path), float(scales[i]), name))
    pipe.set_adapters([a.name for a in adapters], adapter_weights=[a.scale for a in adapters])
    if fuse:
        # The adapter weights set above are part of each layer's scaling, so fusing folds in the scaled deltas.
        pipe.fuse_lora(adapter_names=[a.name for a in adapters], lora_scale=1.0)
        pipe.unload_lora_weights()  # drops the now-unused LoRA layers; the fused base weights stay
    return adapters


def _first_line(err: Exception) -> str:
    """The informative line of a library error (torch's load errors put the reason on the second line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    line = next((x for x in lines if "size mismatch" in x), lines[0])
    return line if len(line) <= 300 else line[:297] + "..."
