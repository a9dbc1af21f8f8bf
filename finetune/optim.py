"""Optimizers by name: `--optimizer adamw | adamw8bit | prodigy | adafactor`.

AdamW is torch's. AdamW8bit is bitsandbytes' (Dettmers et al. 2022, 8-bit optimizer states: a quarter of
AdamW's state memory, which matters for full fine-tuning; a LoRA's states are small either way). Prodigy (Mishchenko
& Defazio 2023) estimates its own step size, so its learning rate is a multiplier, usually 1.0; it comes from the
optional `prodigyopt` package. Adafactor is transformers' with a fixed (not relative) step, so `--learning_rate` and
the LR schedule mean what they mean for the others.

`validate_optim` runs at start-up, before any model is loaded: a choice that cannot run on this machine (8-bit
optimizer or quantised base without CUDA, Prodigy not installed) stops there with one line.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import torch

from difftune.core.config import REFUSED, SETTABLE, option, require
from difftune.core.errors import UserError
from difftune.finetune.planner import checks_this_machine
from difftune.finetune.quantize import cuda_available

logger = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adamw8bit", "prodigy", "adafactor")
# diffusers.optimization.SchedulerType's values (tested against it; importing diffusers here would slow --help).
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup",
                 "piecewise_constant")  # fmt: skip


@dataclass
class OptimizerConfig:
    """The optimizer, its learning-rate schedule and clipping. A resume applies changes of the settable ones."""

    learning_rate: float = option("Peak learning rate.", default=1e-4, resume=SETTABLE, card=True)
    scale_lr: bool = option("Multiply the LR by batch size x accumulation x processes.", default=False,
                            resume=SETTABLE, card=False)  # fmt: skip
    lr_scheduler: str = option("Learning-rate schedule (diffusers' get_scheduler).", default="constant",
                               choices=LR_SCHEDULERS, resume=SETTABLE, card=True)  # fmt: skip
    lr_warmup_steps: int = option("Warm-up steps of the LR schedule.", default=0, resume=SETTABLE, card=True)
    adam_beta1: float = option("AdamW beta1.", default=0.9, resume=SETTABLE, card=False)
    adam_beta2: float = option("AdamW beta2.", default=0.999, resume=SETTABLE, card=False)
    adam_weight_decay: float = option("AdamW weight decay.", default=1e-2, resume=SETTABLE, card=False)
    adam_epsilon: float = option("AdamW epsilon.", default=1e-8, resume=SETTABLE, card=False)
    max_grad_norm: float = option("Clip gradients to this global norm; 0: no clipping.", default=1.0, resume=SETTABLE,
                                  card=False)  # fmt: skip
    optimizer: str = option("The optimizer.", default="adamw", choices=OPTIMIZERS, resume=REFUSED, card=True)
    use_8bit_adam: bool = option("Shorthand for --optimizer adamw8bit (bitsandbytes, CUDA).", default=False,
                                 resume=REFUSED, card=False)  # fmt: skip
    fused_optimizer: bool = option("AdamW's fused kernel (torch; CPU and CUDA).", default=False, resume=REFUSED,
                                   card=False)  # fmt: skip

    def validate(self) -> None:
        require(
            [
                (self.learning_rate > 0, "--learning_rate must be positive"),
                (0.0 <= self.adam_beta1 < 1.0, f"--adam_beta1 {self.adam_beta1} must be within [0, 1)"),
                (0.0 <= self.adam_beta2 < 1.0, f"--adam_beta2 {self.adam_beta2} must be within [0, 1)"),
                (self.adam_epsilon > 0, "--adam_epsilon must be positive (0 divides by zero where a gradient is 0)"),
                (self.lr_warmup_steps >= 0, "--lr_warmup_steps must not be negative"),
                (self.adam_weight_decay >= 0, "--adam_weight_decay must not be negative"),
                (
                    self.max_grad_norm >= 0,
                    f"--max_grad_norm {self.max_grad_norm} must not be negative (0: no clipping)",
                ),
            ]
        )
        validate_optim(self)


def optimizer_name(cfg: OptimizerConfig) -> str:
    """The optimizer `cfg` asks for; `--use_8bit_adam` is the diffusers-scripts spelling of adamw8bit."""
    if not cfg.use_8bit_adam:
        return cfg.optimizer
    if cfg.optimizer not in ("adamw", "adamw8bit"):
        raise UserError(f"--use_8bit_adam means --optimizer adamw8bit; it contradicts --optimizer {cfg.optimizer}")
    return "adamw8bit"


def _import(module: str, why: str, install: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise UserError(f"{why} needs the {module} package, which is not installed: pip install {install}") from err


def validate_optim(cfg: OptimizerConfig) -> None:
    """Stops with one line when the optimizer cannot run here. No model is loaded."""
    name = optimizer_name(cfg)
    if name not in OPTIMIZERS:
        raise UserError(f"--optimizer {name!r}: unknown; choose one of {', '.join(OPTIMIZERS)}")
    if name == "adamw8bit" and checks_this_machine():
        if not cuda_available():
            raise UserError(
                "--optimizer adamw8bit (--use_8bit_adam) needs a CUDA GPU (bitsandbytes); use --optimizer adamw here"
            )
        _import("bitsandbytes", "--optimizer adamw8bit", "'difftune[bnb]'")
    if name == "prodigy" and checks_this_machine():
        _import("prodigyopt", "--optimizer prodigy", "prodigyopt")
    if cfg.fused_optimizer and name != "adamw":
        raise UserError(f"--fused_optimizer is torch's AdamW kernel; --optimizer {name} has none: drop one of them")


def build_optimizer(cfg: OptimizerConfig, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """The optimizer over `params` at peak learning rate `lr`, with the AdamW settings of `cfg` where they apply."""
    validate_optim(cfg)
    name = optimizer_name(cfg)
    betas = (cfg.adam_beta1, cfg.adam_beta2)
    if name == "adamw":
        return torch.optim.AdamW(
            params, lr=lr, betas=betas, weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon,
            fused=cfg.fused_optimizer or None,
        )  # fmt: skip
    if name == "adamw8bit":
        bnb = _import("bitsandbytes", "--optimizer adamw8bit", "'difftune[bnb]'")
        return bnb.optim.AdamW8bit(
            params, lr=lr, betas=betas, weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon
        )
    if name == "prodigy":
        prodigyopt = _import("prodigyopt", "--optimizer prodigy", "prodigyopt")
        if lr < 0.1:
            logger.warning("--optimizer prodigy sets its own step size; its --learning_rate %g is a multiplier, "
                           "usually 1.0", lr)  # fmt: skip
        return prodigyopt.Prodigy(params, lr=lr, betas=betas, weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)
    # adafactor: a fixed step (relative_step=False) so that --learning_rate and --lr_scheduler apply unchanged.
    from transformers.optimization import Adafactor

    return Adafactor(
        params, lr=lr, relative_step=False, scale_parameter=False, warmup_init=False,
        weight_decay=cfg.adam_weight_decay,
    )  # fmt: skip
