"""The memory options of a training run: how the frozen parts are stored and what the step keeps alive.

- `--gradient_checkpointing`: the denoiser recomputes its blocks' activations in the backward pass instead of
  keeping them.
- `--quantize_base nf4|int8` (`finetune.quantize`): the frozen denoiser's linear layers in bitsandbytes' 4/8-bit
  formats, through diffusers' quantization config (CUDA).
- `--fp8_base` (`finetune.fp8`): the frozen denoiser's linear weights stored float8 with row scales, computed in
  the compute precision.
- `--blocks_to_swap N` (`finetune.block_swap`): N of the denoiser's repeated blocks wait in CPU memory and come
  onto the accelerator for their forward and their recomputation.
- Full fine-tuning (`finetune.optimizer_steps`): `--fused_backward_pass` steps each parameter as its gradient is
  ready and frees it; `--full_bf16` keeps the trained weights in bf16 with stochastically rounded updates.

`apply_memory_options` is the one call the loop makes: after the adapter is attached and the weights are cast, it
applies these to the denoiser and places it on the device. The memory planner and the hardware presets
(configs/hardware/) combine them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from difftune.core.config import PASSIVE, REFUSED, option, require
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

    fused_backward_pass: bool = option(
        "Full fine-tuning: step each parameter as soon as its gradient is ready and free the gradient (AdamW or "
        "Adafactor; no accumulation, --max_grad_norm 0).", default=False, resume=PASSIVE, card=False,
    )  # fmt: skip
    full_bf16: bool = option(
        "Full fine-tuning: trained weights and gradients in bf16, each update rounded into them stochastically "
        "(needs --mixed_precision bf16).", default=False, resume=REFUSED, card=True,
    )  # fmt: skip

    def validate(self) -> None:
        if self.quantize_base is not None:
            check_quantize(self.quantize_base)
        n, quantized = self.blocks_to_swap, self.quantize_base
        require([
            (n >= 0, f"--blocks_to_swap {n} must not be negative"),
            (not n or self.gradient_checkpointing,
             f"--blocks_to_swap {n} needs --gradient_checkpointing (a swapped block's forward runs again in the "
             "backward pass): add it"),
            (not (self.fp8_base and quantized), f"--fp8_base and --quantize_base {quantized} both set the base's "
             "storage; drop one"),
            (not (n and quantized), f"--blocks_to_swap cannot move bitsandbytes' packed weights (--quantize_base "
             f"{quantized}); drop one of them"),
        ])  # fmt: skip

    def check_model(self, model: str, index: dict, denoiser_name: str) -> None:
        """The checks that need the denoiser's architecture (its config, not its weights), before loading."""
        if self.blocks_to_swap:
            from difftune.finetune.block_swap import check_count

            check_count(meta_denoiser(model, index, denoiser_name), self.blocks_to_swap)

    def check_run(self, num_processes: int, mixed_precision: str | None) -> None:
        """The checks that need the launched run (its processes, accelerate's precision), before loading."""
        from difftune.finetune.optimizer_steps import check_precision

        single = (("--blocks_to_swap", self.blocks_to_swap), ("--fused_backward_pass", self.fused_backward_pass))
        for flag, on in single:
            if on and num_processes > 1:  # DDP's wrapper places every weight and reduces gradients after the hooks
                raise UserError(f"{flag} runs on one process ({num_processes} launched): drop it or launch one")
        check_precision(self, mixed_precision)


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


def in_cpu_memory(module: nn.Module) -> set[int]:
    """Ids of `module`'s parameters and buffers that the memory options keep in CPU memory right now (swapped blocks
    between uses): a tracer on meta tensors (the memory planner) cannot tell them from the device's by their device."""
    swap = getattr(module, SWAP_ATTRIBUTE, None)
    return {id(t) for t in swap.resting()} if swap is not None else set()


def resident_bytes(denoiser: nn.Module) -> int:
    """Bytes of the denoiser's weights and buffers on the accelerator between uses: all but the swapped blocks'."""
    away = in_cpu_memory(denoiser)
    tensors = {id(t): t for t in [*denoiser.parameters(), *denoiser.buffers()] if id(t) not in away}
    return sum(t.numel() * t.element_size() for t in tensors.values())
