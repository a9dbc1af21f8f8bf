"""The training configurations: each entry script's dataclass, composed of the sections its concerns own.

`LoraTrainConfig` (finetune_lora.py) and `FullTrainConfig` (finetune_full.py) are compositions of sections, each a
dataclass declared in the module of its concern: the data (`finetune.data`), caching (`finetune.cache`), DreamBooth
(`finetune.dreambooth`), the objective (`finetune.objective`), the optimizer (`finetune.optim`), memory
(`finetune.memory`), step speed (`finetune.speed`), checkpoints (`finetune.resume`), validation images
(`finetune.validation`), held-out selection (`finetune.validation_loss`), the Hub (`finetune.hub`), the adapter
(`finetune.adapters`), the memory planner (`finetune.planner`); the model and the run itself are declared here. `core.config` fills them from defaults, YAML
files and flags, all flat and named as in diffusers' example scripts (`--resolution`, not `--data.resolution`).

Every setting says in its metadata what a resume may do with it, whether it goes on the model card, and which
model families or objectives it applies to; `check_family` refuses a setting of another family in one line,
before the model loads. A flag of the other script is an unknown flag here. Every choice is checked and `validate()`
rejects impossible combinations, all before any model is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from difftune.core.config import (
    PASSIVE,
    REFUSED,
    REFUSED_RESTARTS_EPOCH,
    SETTABLE,
    default_of,
    leaves,
    option,
    require,
    section,
)
from difftune.core.errors import UserError
from difftune.core.paths import check_output_dir
from difftune.finetune.adapters import AdapterConfig
from difftune.finetune.cache import CacheConfig
from difftune.finetune.data import DataConfig
from difftune.finetune.dreambooth import DreamBoothConfig
from difftune.finetune.hub import HubConfig
from difftune.finetune.memory import MemoryConfig
from difftune.finetune.objective import ObjectiveConfig
from difftune.finetune.optim import OptimizerConfig, optimizer_name
from difftune.finetune.optimizer_steps import check_step_options
from difftune.finetune.planner import PlanConfig
from difftune.finetune.resume import CheckpointConfig
from difftune.finetune.speed import SpeedConfig
from difftune.finetune.validation import ValidationConfig
from difftune.finetune.validation_loss import SelectionConfig

EMA_DECAY = 0.9999


@dataclass
class ModelConfig:
    """The base model and what its family reads while loading (`pipelines.families.Family.load`)."""

    pretrained_model_name_or_path: str | None = option(
        "Base pipeline: a diffusers folder or Hub id (e.g. stable-diffusion-v1-5/stable-diffusion-v1-5). Required.",
        default=None, resume=REFUSED, card=False,
    )  # fmt: skip
    prediction_type: str | None = option(
        "Default: the scheduler config's.", default=None, choices=("epsilon", "v_prediction"), resume=REFUSED,
        card=True, families=("ddpm",),
    )  # fmt: skip
    rescale_betas_zero_snr: bool = option(
        "Zero terminal SNR noise schedule (use with v_prediction).", default=False, resume=REFUSED, card=True,
        families=("ddpm",),
    )  # fmt: skip
    max_sequence_length: int | None = option(
        "Text tokens per caption of the flow families' long encoder (T5, LLM); default: the family's.",
        default=None, resume=REFUSED, card=False, families=("flow",),
    )  # fmt: skip
    guidance_scale: float | None = option(
        "Guidance-distilled models (Flux.1-dev): the guidance the transformer is conditioned on while training "
        "(default 3.5).", default=None, resume=REFUSED, card=True, families=("flux",),
    )  # fmt: skip
    train_text_encoder: bool = option(
        "Also train the text encoder(s) (LoRA script: LoRA on them).", default=False, resume=REFUSED, card=True
    )

    def validate(self) -> None:
        if not self.pretrained_model_name_or_path:
            raise UserError("--pretrained_model_name_or_path is required: a diffusers pipeline folder or Hub id")
        if self.max_sequence_length is not None and self.max_sequence_length < 1:
            raise UserError("--max_sequence_length must be at least 1")
        if self.guidance_scale is not None and self.guidance_scale < 0:
            raise UserError("--guidance_scale must not be negative")

    def family_options(self) -> dict:
        """The settings a model family reads while loading (see `pipelines.families.Family.load`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.metadata.get("families")}


@dataclass
class TrainingConfig:
    """The run: where it writes, its seed, batch, length, precision, EMA and logging."""

    output_dir: str = option("Where weights, checkpoints, samples and logs go.", default="outputs/run",
                             resume=PASSIVE, card=False)  # fmt: skip
    seed: int = option("Seed of everything random: data order, noise, init.", default=0,
                       resume=REFUSED_RESTARTS_EPOCH, card=True)  # fmt: skip
    train_batch_size: int = option("Batch size per device.", default=1, resume=REFUSED_RESTARTS_EPOCH, card=True)
    num_train_epochs: int = option("Epochs, unless --max_train_steps is set.", default=1, resume=SETTABLE, card=True)
    max_train_steps: int | None = option(
        "Optimizer steps; overrides --num_train_epochs.", default=None, resume=SETTABLE, card=True
    )
    gradient_accumulation_steps: int = option(
        "Micro-batches per optimizer step.", default=1, resume=REFUSED_RESTARTS_EPOCH, card=True
    )
    mixed_precision: str | None = option(
        "Default: accelerate's config.", default=None, choices=("no", "fp16", "bf16"), resume=REFUSED, card=True
    )
    allow_tf32: bool = option("Allow TF32 matmuls on Ampere+ GPUs.", default=False, resume=PASSIVE, card=False)
    use_ema: bool = option(
        "Keep an EMA of the trained weights (of an adapter: its weights only) and save it as the result.",
        default=False, resume=REFUSED, card=True,
    )  # fmt: skip
    ema_decay: float = option("EMA decay (with --use_ema).", default=EMA_DECAY, resume=REFUSED, card=False)
    report_to: str = option("Tracker.", default="tensorboard", choices=("tensorboard", "none"), resume=PASSIVE,
                            card=False)  # fmt: skip
    logging_dir: str = option("Logs folder inside output_dir.", default="logs", resume=PASSIVE, card=False)

    def validate(self) -> None:
        checks = [
            (self.train_batch_size >= 1, "--train_batch_size must be at least 1"),
            (self.gradient_accumulation_steps >= 1, "--gradient_accumulation_steps must be at least 1"),
            (self.max_train_steps is None or self.max_train_steps >= 1, "--max_train_steps must be at least 1"),
            (self.num_train_epochs >= 1, "--num_train_epochs must be at least 1"),
            (0 <= self.seed < 2**32, f"--seed {self.seed} must be within [0, 2**32)"),
            (0.0 < self.ema_decay < 1.0, "--ema_decay must be within (0, 1)"),
            (self.use_ema or self.ema_decay == EMA_DECAY, "--ema_decay only applies with --use_ema; add --use_ema or "
             "drop --ema_decay"),
        ]  # fmt: skip
        require(checks)
        check_output_dir(self.output_dir)


@dataclass
class TrainConfig:
    """Settings both entry scripts share, one section per concern."""

    model: ModelConfig = section(ModelConfig)
    data: DataConfig = section(DataConfig)
    cache: CacheConfig = section(CacheConfig)
    dreambooth: DreamBoothConfig = section(DreamBoothConfig)
    training: TrainingConfig = section(TrainingConfig)
    optim: OptimizerConfig = section(OptimizerConfig)
    objective: ObjectiveConfig = section(ObjectiveConfig)
    memory: MemoryConfig = section(MemoryConfig)
    speed: SpeedConfig = section(SpeedConfig)
    checkpoints: CheckpointConfig = section(CheckpointConfig)
    validation: ValidationConfig = section(ValidationConfig)
    selection: SelectionConfig = section(SelectionConfig)
    hub: HubConfig = section(HubConfig)
    plan: PlanConfig = section(PlanConfig)

    def validate(self) -> None:
        """Each section's checks (a subclass's sections too), all before any model is loaded."""
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        if self.memory.blocks_to_swap and self.speed.compile:
            raise UserError(
                "--blocks_to_swap moves weights in hooks around each swapped block, which --compile would trace into "
                "its graphs; drop one of them"
            )

    def applies_to(self, family_name: str, objective: str) -> list[str]:
        """The flags set away from their defaults that do not apply to this model family (by its name or its
        objective), as `--name` strings."""
        foreign = []
        for name, (value, f) in leaves(self).items():
            families = f.metadata.get("families")
            if families and family_name not in families and objective not in families and value != default_of(f):
                foreign.append(f"--{name}")
        return foreign


def check_family(cfg: TrainConfig, family_name: str, pipeline_class_name: str, objective: str) -> None:
    """One line naming every setting of another family or objective, before the model loads."""
    foreign = cfg.applies_to(family_name, objective)
    if foreign:
        raise UserError(
            f"{', '.join(foreign)} does not apply to {family_name} models ({pipeline_class_name}, {objective} "
            "objective); drop it"
        )


@dataclass
class LoraTrainConfig(TrainConfig):
    """finetune_lora.py: an adapter on the denoiser (and optionally the text encoders) through peft."""

    network: AdapterConfig = section(
        AdapterConfig, "The adapter (kohya calls it the network): peft type, rank, targets."
    )

    def validate(self) -> None:
        super().validate()
        for flag, on in (
            ("fused_backward_pass", self.memory.fused_backward_pass),
            ("full_bf16", self.memory.full_bf16),
        ):
            if on:
                raise UserError(
                    f"--{flag} is for full fine-tuning (finetune_full.py); a LoRA's weights and gradients are a few MB: "
                    f"drop --{flag}"
                )


@dataclass
class FullTrainConfig(TrainConfig):
    """finetune_full.py: the denoiser's own weights (and optionally the text encoders') train."""

    def validate(self) -> None:
        super().validate()
        memory = self.memory
        frozen_base = (("quantize_base", memory.quantize_base), ("fp8_base", memory.fp8_base),
                       ("blocks_to_swap", memory.blocks_to_swap))  # fmt: skip
        check_step_options(memory, self.optim, self.training, optimizer_name(self.optim))
        for flag, value in frozen_base:
            if value:
                raise UserError(
                    f"--{flag}{'' if value is True else f' {value}'} is for a frozen base; full fine-tuning trains it: "
                    f"use finetune_lora.py, or drop --{flag}"
                )
