"""Adapters as peft configs: LoRA (Hu et al. 2021), DoRA (Liu et al. 2024), LoHa and LoKr (LyCORIS, Yeh et al.
2024), attached with peft's `inject_adapter_in_model`. Nothing here writes a layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difftune.core.config import PASSIVE, REFUSED, option, require
from difftune.core.errors import UserError

ADAPTER_NAME = "default"  # peft's adapter name; diffusers' add_adapter uses it when none is given
ADAPTERS = ("lora", "dora", "loha", "lokr")


@dataclass
class AdapterConfig:
    """The adapter (finetune_lora.py): its peft type, size, targets, and the extra file formats written."""

    adapter: str = option("Adapter type (peft).", default="lora", choices=ADAPTERS, resume=REFUSED, card=True)
    rank: int = option("LoRA rank.", default=4, resume=REFUSED, card=True)
    lora_alpha: float | None = option("LoRA alpha; default: equal to rank (scale 1).", default=None, resume=REFUSED,
                                      card=True)  # fmt: skip
    lora_dropout: float = option("LoRA dropout, within [0, 1).", default=0.0, resume=REFUSED, card=True)
    target_modules: list[str] | None = option("Denoiser modules to adapt; default: the family's.", default=None,
                                              resume=REFUSED, card=True)  # fmt: skip
    output_kohya_format: bool = option("Also write the LoRA with kohya/A1111/ComfyUI key names.", default=False,
                                       resume=PASSIVE, card=False)  # fmt: skip

    @property
    def alpha(self) -> float:
        return self.lora_alpha if self.lora_alpha is not None else self.rank

    def validate(self) -> None:
        checks = [
            (self.rank >= 1, "--rank must be at least 1"),
            (0.0 <= self.lora_dropout < 1.0, f"--lora_dropout {self.lora_dropout} must be within [0, 1)"),
            (self.lora_alpha is None or self.lora_alpha > 0, "--lora_alpha must be positive"),
            (not self.output_kohya_format or self.adapter == "lora",
             f"--output_kohya_format writes plain LoRA only; --adapter {self.adapter} has no kohya key format"),
        ]  # fmt: skip
        require(checks)


def adapter_config(cfg: AdapterConfig, target_modules: list[str]):
    """The peft config of `cfg.adapter` (lora | dora | loha | lokr) on `target_modules`; alpha defaults to the rank
    (scale 1)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    kind, rank, alpha, dropout = cfg.adapter, cfg.rank, cfg.alpha, cfg.lora_dropout
    if kind in ("lora", "dora"):
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                          target_modules=target_modules, use_dora=kind == "dora")  # fmt: skip
    if kind == "loha":
        return LoHaConfig(r=rank, alpha=alpha, rank_dropout=dropout, module_dropout=0.0, target_modules=target_modules)
    if kind == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, rank_dropout=dropout, module_dropout=0.0, target_modules=target_modules)
    raise UserError(f"--adapter {kind}: choose lora, dora, loha or lokr")


def add_adapter(model: torch.nn.Module, config) -> list[torch.nn.Parameter]:
    """Attaches a peft adapter (named "default"); returns its trainable parameters.

    peft's `inject_adapter_in_model` works for diffusers' models and transformers' text encoders alike (the
    transformers `add_adapter` wrapper refuses some peft versions)."""
    from peft import inject_adapter_in_model

    try:
        inject_adapter_in_model(config, model, ADAPTER_NAME)
    except ValueError as err:
        raise UserError(f"--target_modules {sorted(config.target_modules)}: {str(err).splitlines()[0]}") from err
    model.peft_config = {ADAPTER_NAME: config}
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = True
    return [p for p in model.parameters() if p.requires_grad]
