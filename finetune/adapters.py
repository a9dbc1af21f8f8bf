"""Adapters as peft configs: LoRA (Hu et al. 2021), DoRA (Liu et al. 2024), LoHa and LoKr (LyCORIS, Yeh et al.
2024), attached with peft's `inject_adapter_in_model`. Nothing here writes a layer."""

from __future__ import annotations

import torch

from difftune.core.errors import UserError

ADAPTER_NAME = "default"  # peft's adapter name; diffusers' add_adapter uses it when none is given


def adapter_config(kind: str, rank: int, alpha: float | None, dropout: float, target_modules: list[str]):
    """The peft config of `kind` (lora | dora | loha | lokr); alpha defaults to the rank (scale 1)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    alpha = alpha if alpha is not None else rank
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
