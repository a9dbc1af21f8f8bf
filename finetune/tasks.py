"""What an entry script trains, as data: LoRA (an adapter on the frozen base) or full fine-tuning.

A `Task` says which config class its script reads, which modules train (`setup` returns them with the EMA decay,
if any), how the result is saved, and whether the frozen denoiser may be loaded quantised. The loop reads these
fields and never asks which task it runs; a new adapter type is a peft config in `finetune.adapters`, not a task.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from difftune.core.errors import UserError
from difftune.core.files import atomic, remove
from difftune.finetune.adapters import adapter_config, add_adapter
from difftune.finetune.config import FullTrainConfig, LoraTrainConfig, TrainConfig

if TYPE_CHECKING:  # the entry scripts import this module before deciding what the run imports (finetune.startup)
    from difftune.pipelines.families import Family


@dataclass
class Trainable:
    """The modules the optimizer steps, by component name, and the EMA decay to keep over their parameters."""

    models: dict[str, torch.nn.Module]
    ema_decay: float | None = None


@dataclass(frozen=True)
class Task:
    name: str  # "lora" | "full": in messages and the model card
    config_class: type[TrainConfig]
    setup: Callable[[Family, TrainConfig], Trainable]
    save: Callable[[Family, TrainConfig, Path], None]
    load_denoiser: Callable[[type[Family], TrainConfig, torch.dtype], torch.nn.Module | None]
    result: str  # what is saved, for the closing line
    check: Callable[[type[Family], TrainConfig], None]  # settings the family cannot honour, before anything loads
    raw_beside_ema: bool = False  # with --use_ema, also save the raw weights (cheap for adapters) under raw/


def _no_denoiser(family_cls, cfg, dtype) -> None:
    return None


def _no_check(family_cls, cfg) -> None:
    return None


# ----------------------------------------------------------------------------------------------- LoRA


def lora_setup(family: Family, cfg: LoraTrainConfig) -> Trainable:
    targets = cfg.network.target_modules or family.default_lora_targets()
    add_adapter(family.denoiser, adapter_config(cfg.network, targets))
    models = {family.denoiser_name: family.denoiser}
    if cfg.model.train_text_encoder:
        for name, encoder in family.trainable_text_encoders().items():
            add_adapter(encoder, adapter_config(cfg.network, list(family.text_lora_targets)))
            models[name] = encoder
    # The EMA covers the trainable parameters only: here the adapter's, a few MB, not the base model.
    return Trainable(models, ema_decay=cfg.training.ema_decay if cfg.training.use_ema else None)


def lora_save(family: Family, cfg: LoraTrainConfig, output_dir: Path) -> None:
    from difftune.finetune.export import save_lora, save_lora_kohya, save_peft_adapters, write_model_card

    models = {family.denoiser_name: family.denoiser, **family.text_encoders()}
    if cfg.network.adapter in ("loha", "lokr"):  # no diffusers LoRA format exists for these: peft's own format
        save_peft_adapters(type(family), output_dir, models)
    else:
        save_lora(type(family), models, output_dir)
    if cfg.network.output_kohya_format:
        save_lora_kohya(type(family), models, output_dir)
    write_model_card(output_dir, cfg, "lora", type(family))


def lora_denoiser(family_cls: type[Family], cfg: LoraTrainConfig, dtype: torch.dtype) -> torch.nn.Module | None:
    """The frozen denoiser quantised (`--quantize_base`), or None to load it as it is."""
    if cfg.memory.quantize_base is None:
        return None
    from difftune.finetune.quantize import load_quantized

    model, mode = cfg.model.pretrained_model_name_or_path, cfg.memory.quantize_base
    return load_quantized(model, family_cls.denoiser_name, mode, dtype)


def lora_check(family_cls: type[Family], cfg: LoraTrainConfig) -> None:
    if cfg.network.output_kohya_format:
        from difftune.finetune.export_formats import kohya_format

        kohya_format(family_cls)  # a UserError for a family without a kohya file


LORA = Task(
    "lora", LoraTrainConfig, lora_setup, lora_save, lora_denoiser, result="LoRA", check=lora_check, raw_beside_ema=True
)


# ----------------------------------------------------------------------------------------------- full


def full_setup(family: Family, cfg: FullTrainConfig) -> Trainable:
    models = {family.denoiser_name: family.denoiser}
    if cfg.model.train_text_encoder:
        models.update(family.trainable_text_encoders())
    for model in models.values():
        model.requires_grad_(True)
    return Trainable(models, ema_decay=cfg.training.ema_decay if cfg.training.use_ema else None)


def full_save(family: Family, cfg: FullTrainConfig, output_dir: Path) -> None:
    """A diffusers pipeline folder: the trained modules (EMA weights, when kept, are already in them)."""
    from diffusers import DiffusionPipeline

    from difftune.finetune.export import write_model_card

    # Parts not loaded (text encoders whose outputs were computed ahead) come from the base folder.
    parts = {name: module for name, module in family.parts.items() if name != "noise_scheduler" and module is not None}
    extras = family.from_pretrained_kwargs(family.index, family.model)
    kwargs = {**extras, **parts, **family.stand_ins()}  # the trained modules win
    pipe = DiffusionPipeline.from_pretrained(cfg.model.pretrained_model_name_or_path, **kwargs)
    # Written into a temporary folder beside the output, then each component moved in (renames need no space): a
    # full disk leaves no half-written component.
    staging = Path(output_dir) / f".pipeline.{os.getpid()}.tmp"
    remove(staging)
    try:
        pipe.save_pretrained(staging, safe_serialization=True)
        for entry in sorted(staging.iterdir()):
            with atomic(Path(output_dir) / entry.name) as target:
                entry.rename(target)
    finally:
        remove(staging)
    write_model_card(output_dir, cfg, "full", type(family))


FULL = Task("full", FullTrainConfig, full_setup, full_save, _no_denoiser, result="pipeline", check=_no_check)


def task_named(name: str) -> Task:
    """The task `lora` or `full`."""
    tasks = {task.name: task for task in (LORA, FULL)}
    if name not in tasks:
        raise UserError(f"unknown task {name!r}; choose one of {', '.join(tasks)}")
    return tasks[name]
