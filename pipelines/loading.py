"""Loading a pipeline (folder or Hub id) and LoRA adapters onto it, with one-line errors.

The family (SD 1.x, 2.x, SDXL, SD 3/3.5, Flux) comes from `pipelines.families.detect`, the detection training uses too; the
family names the diffusers pipeline class and its `from_pretrained` options (no safety checker for SD 1/2).
LoRA files are loaded by diffusers' `load_lora_weights`, which reads the diffusers/peft key format
(`unet.`/`text_encoder.` + `lora_A`/`lora_B`) and converts kohya files (`lora_unet_*`, `lora_te_*`,
`.lora_down`/`.lora_up`/`.alpha`) itself; each adapter gets a name and a scale. Only safetensors files are read
(never a pickle), and each is opened before any model loads, so a broken file, or one trained for another family
(a Flux LoRA on SD 1.5), is one line, early.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from safetensors import SafetensorError, safe_open
from transformers.utils import logging as transformers_logging

from difftune.core.errors import UserError
from difftune.pipelines.families import Family, detect, read_model_index

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' keys: the name `save_lora_weights` writes
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"  # the same adapter in kohya's keys, for A1111 and ComfyUI
LORA_WEIGHT_NAMES = (LORA_FILE, KOHYA_FILE)  # looked for, in this order, in a training output folder


def resolve_device(device: str) -> str:
    """`auto` is the GPU when there is one, else the CPU; any other name is itself."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def check_device(device: str, dtype: str = "fp32") -> None:
    """A `UserError` unless `device` exists here and can run `dtype`."""
    device = resolve_device(device)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of: {', '.join(DTYPES)}")
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} requested but CUDA is not available here; use --device cpu")
    if dtype == "fp16" and kind != "cuda":
        raise UserError("--dtype fp16 needs --device cuda; use fp32 or bf16 on CPU")


def load_pipeline(model: str, dtype: str = "fp32", device: str = "cpu") -> tuple[DiffusionPipeline, type[Family]]:
    """The pipeline at `model` on `device` (`auto`: the GPU if there is one) in `dtype`, and its family."""
    device = resolve_device(device)
    check_device(device, dtype)
    index = read_model_index(model)
    family = detect(model, index)
    bars = diffusers_logging.is_progress_bar_enabled(), transformers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()  # loading a local pipeline takes a second: no bars to clutter stderr
    transformers_logging.disable_progress_bar()
    try:
        pipe = family.pipeline_class().from_pretrained(
            model, dtype=DTYPES[dtype], **family.from_pretrained_kwargs(index)
        )
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
        raise UserError(f"no LoRA weights in {lora}: expected {LORA_FILE} or a single .safetensors file")
    raise UserError(f"LoRA {lora!r} not found")


def check_lora_file(lora: str) -> Path:
    """The LoRA's weights file, opened to check it is a readable safetensors file with tensors in it."""
    path = resolve_lora_file(lora)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(
            f"LoRA {lora}: {path.name} is not a readable safetensors file ({_first_line(err)}); "
            f"give the {LORA_FILE} that training wrote"
        ) from err
    if not keys:
        raise UserError(f"LoRA {lora}: {path.name} holds no tensors")
    return path


def lora_target(keys: list[str]) -> str | None:
    """Which denoiser a LoRA file's keys address: "flux", "transformer" (SD3 or Flux), "unet", or None (text
    encoders only). diffusers/peft keys (`unet.`, `transformer.`) and kohya/ComfyUI ones (`lora_unet_*`, whose Flux
    files name `double_blocks`/`single_blocks`) are both read."""
    if any("single_transformer_blocks" in k or k.startswith(("lora_unet_double_blocks", "lora_unet_single_blocks"))
           for k in keys):  # fmt: skip
        return "flux"
    if any(k.startswith(("transformer.", "lora_transformer_")) for k in keys):
        return "transformer"
    if any(k.startswith(("unet.", "lora_unet_")) for k in keys):
        return "unet"
    return None


TARGET_NAMES = {"flux": "a Flux model", "transformer": "an SD 3/3.5 or Flux model", "unet": "an SD 1.x/2.x/SDXL model"}


def check_lora_fits(lora: str, family: type[Family], model: str) -> None:
    """A one-line `UserError` naming both families when the LoRA was trained for another kind of model."""
    with safe_open(str(resolve_lora_file(lora)), framework="pt") as f:
        target = lora_target(list(f.keys()))
    fits = {"unet": family.denoiser_name == "unet", "transformer": family.denoiser_name == "transformer",
            "flux": family.name in ("flux", "flux-kontext"), None: True}[target]  # fmt: skip
    if not fits:
        raise UserError(
            f"LoRA {lora} was trained for {TARGET_NAMES[target]}; {model} is {family.name} "
            f"({family.pipeline_class_name}): give a LoRA of this model's family"
        )


def match_scales(loras: list[str], scales: list[float]) -> list[float]:
    """One scale per LoRA: `scales` itself, or its one value repeated."""
    if not loras:
        if len(scales) > 1:
            raise UserError("--lora_scale given more than once but no --lora")
        return []
    if len(scales) == 1:
        return scales * len(loras)
    if len(scales) != len(loras):
        raise UserError(f"{len(loras)} --lora but {len(scales)} --lora_scale: give one scale, or one per LoRA")
    return list(scales)


@dataclass(frozen=True)
class Adapter:
    path: str
    scale: float
    name: str


def load_loras(pipe: DiffusionPipeline, loras: list[str], scales: list[float], fuse: bool = False) -> list[Adapter]:
    """Loads each LoRA as a named adapter, activates them all with their scales, and optionally fuses them.

    A LoRA that does not fit the model (made for another family or size) is one `UserError` line."""
    scales = match_scales(loras, scales)
    adapters = []
    for i, lora in enumerate(loras):
        path = check_lora_file(lora)
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
    if not adapters:
        return []
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
