"""Optimizers by name. AdamW is torch's; the others come from their libraries when installed."""

from __future__ import annotations

import torch

from pipelines.errors import UserError


def build_optimizer(cfg, params: list[torch.nn.Parameter], lr: float) -> torch.optim.Optimizer:
    name = "adamw8bit" if cfg.use_8bit_adam else cfg.optimizer
    if name == "adamw":
        return torch.optim.AdamW(
            params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay,
            eps=cfg.adam_epsilon,
        )  # fmt: skip
    raise UserError(f"--optimizer {name}: not supported yet; use adamw")
