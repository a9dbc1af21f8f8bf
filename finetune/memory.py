"""The memory options of a training run: how the frozen parts are stored and what the step keeps alive.

- `--gradient_checkpointing`: the denoiser recomputes its blocks' activations in the backward pass instead of
  keeping them.
- `--quantize_base nf4|int8` (`finetune.quantize`): the frozen denoiser's linear layers in bitsandbytes' 4/8-bit
  formats, through diffusers' quantization config (CUDA).
- `--fp8_base` (`finetune.fp8`): the frozen denoiser's linear weights stored float8 with row scales, computed in
  the compute precision.
- `--blocks_to_swap N` (`finetune.block_swap`): N of the denoiser's repeated blocks wait in CPU memory and come
  onto the accelerator for their forward and their recomputation.

`apply_memory_options` is the one call the loop makes: after the adapter is attached and the weights are cast, it
applies these to the denoiser and places it on the device. The memory planner and the hardware presets
(configs/hardware/) combine them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from difftune.core.config import PASSIVE, REFUSED, option
from difftune.core.errors import UserError
from difftune.finetune.quantize import MODES, check_quantize

SWAP_ATTRIBUTE = "_difftune_block_swap"  # where `apply_memory_options` leaves the denoiser's BlockSwap


@dataclass
class MemoryConfig:
    """What trades speed or precision for accelerator memory."""

    gradient_checkpointing: bool = option(
        "Recompute the denoiser's activations in the backward pass instead of keeping them.", default=False,
        resume=PASSIVE, card=False,
    )  # fmt: skip
    quantize_base: str | None = option(
        "Load the frozen denoiser quantised (bitsandbytes, CUDA; LoRA only).", default=None, choices=MODES,
        resume=REFUSED, card=True,
    )  # fmt: skip
    fp8_base: bool = option(
        "Store the frozen denoiser's linear weights as float8 (e4m3, a scale per row), computed in the compute "
        "precision: half the memory of bf16 (LoRA only).", default=False, resume=REFUSED, card=True,
    )  # fmt: skip
    blocks_to_swap: int = option(
        "Keep N of the denoiser's repeated blocks in CPU memory, each moved onto the accelerator for its forward "
        "and its recomputation (needs --gradient_checkpointing; LoRA only).", default=0, resume=PASSIVE, card=False,
    )  # fmt: skip

    def validate(self) -> None:
        if self.quantize_base is not None:
            check_quantize(self.quantize_base)
        if self.blocks_to_swap < 0:
            raise UserError(f"--blocks_to_swap {self.blocks_to_swap} must not be negative")
        if self.blocks_to_swap and not self.gradient_checkpointing:
            raise UserError(
                f"--blocks_to_swap {self.blocks_to_swap} needs --gradient_checkpointing (a swapped block's forward "
                "runs again in the backward pass): add it"
            )
        if self.fp8_base and self.quantize_base is not None:
            raise UserError(
                f"--fp8_base and --quantize_base {self.quantize_base} both set the base's storage; drop one"
            )
        if self.blocks_to_swap and self.quantize_base is not None:
            raise UserError(
                f"--blocks_to_swap cannot move bitsandbytes' packed weights (--quantize_base {self.quantize_base}); "
                "drop one of them"
            )

    def check_model(self, model: str, index: dict, denoiser_name: str) -> None:
        """The checks that need the denoiser's architecture (its config, not its weights), before loading."""
        if self.blocks_to_swap:
            from difftune.finetune.block_swap import check_count

            check_count(meta_denoiser(model, index, denoiser_name), self.blocks_to_swap)

    def check_run(self, num_processes: int) -> None:
        """The checks that need the launched run (its processes), before loading."""
        if self.blocks_to_swap and num_processes > 1:
            raise UserError(
                f"--blocks_to_swap runs on one process ({num_processes} launched): distributed wrappers place every "
                "weight on the device; drop it or launch one process"
            )


def meta_denoiser(model: str, index: dict, denoiser_name: str) -> nn.Module:
    """The pipeline's denoiser built from its config on the meta device: its architecture without its weights."""
    from difftune.pipelines.families.base import component_class

    cls = component_class(index, denoiser_name, model)
    with torch.device("meta"):
        return cls.from_config(cls.load_config(model, subfolder=denoiser_name))


def apply_memory_options(denoiser: nn.Module, memory: MemoryConfig, device: torch.device) -> None:
    """Applies `memory` to the denoiser (adapter attached, weights cast) and places it on `device`: linear weights
    in float8 with `fp8_base`, the swapped blocks' frozen tensors in CPU memory (their `BlockSwap` under `SWAP_ATTRIBUTE`), everything else on the device
    (a quantised denoiser is already there); gradient checkpointing with the swap's checkpoint function or
    diffusers' own."""
    if memory.fp8_base:  # before placing it: the full-precision weights never reach the device
        from difftune.finetune.fp8 import to_fp8

        to_fp8(denoiser)
    if memory.blocks_to_swap:
        from difftune.finetune.block_swap import BlockSwap

        setattr(denoiser, SWAP_ATTRIBUTE, BlockSwap.attach(denoiser, memory.blocks_to_swap, device))
        return
    if memory.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if memory.quantize_base is None:
        denoiser.to(device)


def places_itself(module: nn.Module) -> bool:
    """Whether `module`'s placement is the memory options' (accelerate must not move it to the device whole)."""
    return getattr(module, SWAP_ATTRIBUTE, None) is not None
