"""The memory options of a training run: how the frozen parts are stored and what the step keeps alive.

Gradient checkpointing (the denoiser recomputes its blocks' activations in the backward pass instead of keeping
them) and a quantised frozen base (`finetune.quantize`: bitsandbytes NF4/int8 through diffusers' quantization
config). The memory planner and the hardware presets (configs/hardware/) combine these.
"""

from __future__ import annotations

from dataclasses import dataclass

from difftune.core.config import PASSIVE, REFUSED, option
from difftune.finetune.quantize import MODES, check_quantize


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

    def validate(self) -> None:
        if self.quantize_base is not None:
            check_quantize(self.quantize_base)
