"""Loading a pipeline (folder or Hub id) and LoRA adapters onto it, with one-line errors.

The family (SD 1.x, 2.x, SDXL, SD 3/3.5, Flux, Flux.2, Qwen-Image, Z-Image, Chroma) comes from `pipelines.families.detect`, the detection training uses too; the
family names the diffusers pipeline class and its `from_pretrained` options (no safety checker for SD 1/2).
LoRA files are loaded by diffusers' `load_lora_weights`, which reads the diffusers/peft key format
(`unet.`/`text_encoder.` + `lora_A`/`lora_B`) and converts kohya files (`lora_unet_*`, `lora_te_*`,
`.lora_down`/`.lora_up`/`.alpha`) itself; each adapter gets a name and a scale. Only safetensors files are read
(never a pickle), and each is opened before any model loads, so a broken file, or one trained for another family
(a Flux LoRA on SD 1.5), is one line, early.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import logging as diffusers_logging
from safetensors import SafetensorError, safe_open

from difftune.core.errors import UserError
from difftune.core.quiet import no_loading_bars
from difftune.pipelines.families import Family, detect, read_model_index

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LORA_FILE = "pytorch_lora_weights.safetensors"  # diffusers' keys: the name `save_lora_weights` writes
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"  # the same adapter in kohya's keys, for A1111 and ComfyUI
LORA_WEIGHT_NAMES = (LORA_FILE, KOHYA_FILE)  # looked for, in this order, in a training output folder
PEFT_WEIGHTS, PEFT_CONFIG = "adapter_model.safetensors", "adapter_config.json"  # peft's layout (LoHa, LoKr): a folder
FAMILY_KEY = "difftune.family"  # safetensors metadata: the family the adapter was trained on


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
    try:
        with no_loading_bars():
            pipe = family.pipeline_class().from_pretrained(
                model, dtype=DTYPES[dtype], **family.from_pretrained_kwargs(index, model)
            )
    except (OSError, ValueError) as err:
        raise UserError(f"could not load the pipeline at {model}: {str(err).splitlines()[0]}") from err
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


def peft_folders(lora: str) -> dict[str, Path]:
    """The adapters in peft's own layout (LoHa, LoKr) of a training output folder: component name -> its folder
    (`unet/adapter_model.safetensors` + `adapter_config.json`, ...); empty for any other LoRA."""
    path = Path(lora)
    if not path.is_dir() or any((path / name).is_file() for name in LORA_WEIGHT_NAMES):
        return {}
    return {
        sub.name: sub
        for sub in sorted(path.iterdir())
        if (sub / PEFT_CONFIG).is_file() and (sub / PEFT_WEIGHTS).is_file()
    }


def weight_files(lora: str) -> list[Path]:
    """The safetensors file(s) of a LoRA: one file, or one per component for peft's layout."""
    folders = peft_folders(lora)
    return [folder / PEFT_WEIGHTS for folder in folders.values()] if folders else [resolve_lora_file(lora)]


def _open(lora: str, path: Path) -> tuple[list[str], dict[str, str]]:
    """A LoRA file's keys and metadata; a `UserError` naming it when it is not a readable safetensors file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()), f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(
            f"LoRA {lora}: {path.name} is not a readable safetensors file ({_first_line(err)}); "
            f"give the {LORA_FILE} that training wrote"
        ) from err


def check_lora_file(lora: str) -> Path:
    """The LoRA's weights file (or, for peft's layout, its folder), each file opened to check it is a readable
    safetensors file with tensors in it."""
    for path in weight_files(lora):
        keys, _ = _open(lora, path)
        if not keys:
            raise UserError(f"LoRA {lora}: {path.name} holds no tensors")
    return Path(lora) if peft_folders(lora) else resolve_lora_file(lora)


def _bfl(key: str) -> bool:
    return key.startswith(("lora_unet_double_blocks", "lora_unet_single_blocks"))


FLUX1_NAMES, FLUX2_NAMES = ("flux", "flux-kontext", "chroma"), ("flux2", "flux2_klein")
# What a LoRA file's keys address, most specific first: (name, description, test of one key, the families it fits;
# None: every family with that denoiser). diffusers/peft keys (`unet.`, `transformer.`) and kohya/ComfyUI ones
# (`lora_unet_*`; Flux files name BFL's `double_blocks`/`single_blocks`) are both read.
TARGETS: tuple[tuple[str, str, Callable[[str], bool], tuple[str, ...] | None], ...] = (
    ("flux2", "a Flux.2 model", lambda k: any(p in k for p in ("to_qkv_mlp_proj", "ff.linear_", "ff_context.linear_")),
     FLUX2_NAMES),
    ("qwen_image", "a Qwen-Image model", lambda k: any(p in k for p in ("img_mlp.", "txt_mlp.", "img_mod.", "txt_mod.")),
     ("qwen_image", "qwen-image-edit", "qwen-image-edit-plus")),
    ("z_image", "a Z-Image model", lambda k: any(p in k for p in (".attention.to_", ".feed_forward.w", "refiner.")),
     ("z_image",)),
    ("flux", "a Flux.1/Chroma model", lambda k: "single_transformer_blocks" in k, FLUX1_NAMES),
    ("bfl", "a Flux model (Black Forest Labs' keys)", _bfl, FLUX1_NAMES + FLUX2_NAMES),
    ("transformer", "a transformer model (SD 3/3.5, Flux, ...)", lambda k: k.startswith(("transformer.", "lora_transformer_")),
     None),
    ("unet", "an SD 1.x/2.x/SDXL model", lambda k: k.startswith(("unet.", "lora_unet_")), None),
)  # fmt: skip


def lora_target(keys: list[str]) -> str | None:
    """Which kind of denoiser a LoRA file's keys address (a `TARGETS` name), or None (text encoders only)."""
    for name, _, addresses, _ in TARGETS:
        if any(addresses(k) for k in keys):
            return name
    return None


def fits(target: str | None, family: type[Family]) -> bool:
    """Whether a LoRA addressing `target` can load into `family`'s pipeline."""
    if target is None:
        return True
    _, _, _, families = next(t for t in TARGETS if t[0] == target)
    if families is not None:
        return family.name in families
    return family.denoiser_name == target  # "transformer" or "unet"


# What other trainers write in the metadata: kohya's `ss_base_model_version` and the modelspec `architecture`
# (prefixes), as our family names.
FOREIGN_FAMILY_KEYS = {
    "ss_base_model_version": {"sd_v1": "sd1", "sd_v2": "sd2", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux"},
    "modelspec.architecture": {"stable-diffusion-v1": "sd1", "stable-diffusion-v2": "sd2",
                               "stable-diffusion-xl": "sdxl", "stable-diffusion-3": "sd3", "flux": "flux"},
}  # fmt: skip


def trained_family(metadata: dict[str, str]) -> str | None:
    """The family a LoRA file says it was trained on (difftune's key, else kohya's or modelspec's), or None."""
    if metadata.get(FAMILY_KEY):
        return metadata[FAMILY_KEY]
    for key, prefixes in FOREIGN_FAMILY_KEYS.items():
        value = metadata.get(key, "")
        for prefix, family in prefixes.items():
            if value.startswith(prefix):
                return family
    return None


def check_lora_fits(lora: str, family: type[Family], model: str) -> None:
    """A one-line `UserError` naming both families when the LoRA was trained for another kind of model: by the
    family its file names, its keys, or (peft's layout) its components."""
    components = set(peft_folders(lora))
    own = {family.denoiser_name, *family.text_encoder_names}
    if components - own:
        raise UserError(
            f"LoRA {lora} holds adapters for {', '.join(sorted(components - own))}, which {model} ({family.name}, "
            f"{family.pipeline_class_name}) does not have: give a LoRA of this model's family"
        )
    for path in weight_files(lora):
        keys, metadata = _open(lora, path)
        named = trained_family(metadata)
        if named is not None and named not in (family.name, *family.lora_families):
            raise UserError(
                f"LoRA {lora} was trained on an {named} model (its file says so); {model} is {family.name} "
                f"({family.pipeline_class_name}): give a LoRA of this model's family"
            )
        target = lora_target(keys)
        if not fits(target, family):
            description = next(t[1] for t in TARGETS if t[0] == target)
            raise UserError(
                f"LoRA {lora} was trained for {description}; {model} is {family.name} ({family.pipeline_class_name}): "
                "give a LoRA of this model's family"
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
            folders = peft_folders(lora)
            if folders:
                load_peft_adapters(pipe, folders, name)
            else:
                source, kwargs = _lora_source(pipe, path)
                pipe.load_lora_weights(source, adapter_name=name, **kwargs)
        except (RuntimeError, ValueError, KeyError, AttributeError, AssertionError, TypeError) as err:
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


def _lora_source(pipe: DiffusionPipeline, path: Path) -> tuple[str | dict, dict]:
    """What `load_lora_weights` is given: the file, or for a Flux file in kohya/BFL keys its tensors converted to
    diffusers' keys here (`pipelines.kohya_flux`: diffusers' own converter assumes Flux.1's width)."""
    from safetensors.torch import load_file

    from difftune.pipelines import kohya_flux

    keys, _ = _open(str(path), path)
    if hasattr(pipe, "transformer") and kohya_flux.is_kohya_flux(keys):
        state, unknown = kohya_flux.to_diffusers(
            load_file(path), pipe.transformer, getattr(pipe, "text_encoder", None)
        )
        if not unknown:
            return state, {}
    return str(path.parent), {"weight_name": path.name}


def load_peft_adapters(pipe: DiffusionPipeline, folders: dict[str, Path], name: str) -> None:
    """Adapters saved in peft's layout (LoHa, LoKr: diffusers has no file format for them) added to the pipeline's
    components through peft as the adapter `name`, and registered as diffusers registers its LoRAs, so that
    `set_adapters` (scales), `fuse_lora` and `unload_lora_weights` treat them alike."""
    from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    for component, folder in folders.items():
        module = getattr(pipe, component, None)
        if module is None:
            raise ValueError(f"the pipeline has no {component} for {folder}")
        config = PeftConfig.from_pretrained(str(folder))
        inject_adapter_in_model(config, module, adapter_name=name)
        result = set_peft_model_state_dict(module, load_file(folder / PEFT_WEIGHTS), adapter_name=name)
        misfit = [*result.unexpected_keys, *(k for k in result.missing_keys if f".{name}" in k)]
        if misfit:
            raise ValueError(f"{folder / PEFT_WEIGHTS}: {len(misfit)} adapter tensors do not fit (first: {misfit[0]})")
        module.peft_config = {**(getattr(module, "peft_config", None) or {}), name: config}
        module._hf_peft_config_loaded = True


def _first_line(err: Exception) -> str:
    """The informative line of a library error (torch's load errors put the reason on the second line)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()] or [type(err).__name__]
    line = next((x for x in lines if "size mismatch" in x), lines[0])
    return line if len(line) <= 300 else line[:297] + "..."
