"""A cheaper training step than eager PyTorch: compiled denoiser, channels-last UNets, fused AdamW.

- `--compile`: `torch.compile` of the denoiser. Scope `blocks` (default) compiles only its repeated blocks, through
  diffusers' own regional compilation (`ModelMixin.compile_repeated_blocks`, which compiles every submodule whose
  class is in the model's `_repeated_blocks`): one graph serves every copy of a block, so compiling takes seconds
  rather than minutes. A model that names no repeated blocks (diffusers' SD3 transformer) is compiled whole, as is
  every model under scope `model`. peft's adapter layers sit inside the blocks and are compiled with them.
- Compilation happens at the first call, so that is where it can fail (no C++ compiler for inductor on CPU, no
  triton on CUDA, an operation dynamo cannot trace). The first call is guarded: if the compiled call fails and the
  eager one works, one warning names the error and training goes on eagerly. An error that eager PyTorch raises
  too is the model's, and is raised as it is.
- `--channels_last`: the denoiser's 4-D weights in channels-last memory format; oneDNN (CPU) and cuDNN convolutions
  then run in NHWC without converting on every call. Only convolutional denoisers (UNets) have such weights.
- `--fused_optimizer` (finetune.optim): AdamW's fused kernel, one kernel for every parameter (CPU and CUDA).
- bf16 autocast on CPU is `--mixed_precision bf16`, accelerate's; attention goes through
  `torch.nn.functional.scaled_dot_product_attention` (diffusers' default processors), whose dispatcher already picks
  the fastest kernel the device has (flash, memory-efficient or cuDNN on CUDA, the flash kernel on CPU).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import MethodType

import torch
from torch import nn

from difftune.core.config import PASSIVE, option

logger = logging.getLogger(__name__)

SCOPES = ("blocks", "model")


@dataclass
class SpeedConfig:
    """Options that make a step cheaper without changing what it computes (beyond float rounding)."""

    compile: bool = option("torch.compile the denoiser; the first step compiles.", default=False, resume=PASSIVE,
                           card=False)  # fmt: skip
    compile_scope: str = option(
        "With --compile: 'blocks' compiles the repeated blocks (diffusers' regional compilation), 'model' all of it.",
        default="blocks", choices=SCOPES, resume=PASSIVE, card=False,
    )  # fmt: skip
    channels_last: bool = option("A convolutional denoiser's (UNet's) weights in channels-last format.",
                                 default=False, resume=PASSIVE, card=False)  # fmt: skip

    def validate(self) -> None:
        pass


def speed_up_denoiser(denoiser: nn.Module, compile: bool, scope: str = "blocks", channels_last: bool = False) -> None:
    """Applies the step options to the denoiser in place, after its adapters are attached and it is placed."""
    if channels_last and any(p.dim() == 4 for p in denoiser.parameters()):
        denoiser.to(memory_format=torch.channels_last)
    if compile:
        compile_denoiser(denoiser, scope)


def compile_denoiser(denoiser: nn.Module, scope: str = "blocks", backend: str | Callable = "inductor") -> str:
    """Compiles `denoiser` (regionally where it names repeated blocks, unless `scope` is "model") behind a guard
    that falls back to eager on a compile error; returns the scope used."""
    if scope not in SCOPES:
        raise ValueError(f"compile scope {scope!r}: choose one of {', '.join(SCOPES)}")
    name = type(denoiser).__name__
    eager = denoiser.forward
    if scope == "blocks" and getattr(denoiser, "_repeated_blocks", None):
        denoiser.compile_repeated_blocks(backend=backend)
        compiled = eager  # the blocks inside it are compiled
        logger.info(
            "compiling the repeated blocks of %s (%s) at the first step", name, ", ".join(denoiser._repeated_blocks)
        )
    else:
        scope = "model"
        compiled = torch.compile(eager, backend=backend)
        logger.info("compiling the whole %s at the first step", name)
    # A bound method, as `forward` was: accelerate wraps and later unwraps it through `forward.__func__`.
    denoiser.forward = MethodType(_FirstCallGuard(compiled, eager), denoiser)
    return scope


class _FirstCallGuard:
    """The denoiser's `forward` while compiled: calls the compiled forward; if that raises and the eager forward
    does not, warns once with the reason and stays eager from then on."""

    def __init__(self, compiled: Callable, eager: Callable):
        self.compiled, self.eager = compiled, eager
        self.failed = False

    def __call__(self, module: nn.Module, *args, **kwargs):
        if self.failed:
            return self.eager(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except Exception as err:  # noqa: BLE001 - compile errors come in many classes (dynamo, inductor, compilers)
            self.failed = True
            uncompile(module)
            out = self.eager(*args, **kwargs)  # the model's own errors are raised here, without a compile warning
            logger.warning("--compile: torch.compile failed for %s (%s); training continues eagerly",
                           type(module).__name__, why(err))  # fmt: skip
            return out


def why(err: BaseException) -> str:
    """The first line of the error underneath: dynamo wraps a backend's error in `BackendCompilerFailed`, whose
    message opens with only "backend=... raised:"."""
    while (inner := getattr(err, "inner_exception", None) or err.__cause__) is not None:
        err = inner
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:300]}" if lines else type(err).__name__


def uncompile(module: nn.Module) -> None:
    """Undoes `nn.Module.compile` on `module` and its submodules. torch has no public inverse; `compile` sets
    `_compiled_call_impl`, which `__call__` uses while it is not None."""
    for sub in module.modules():
        if getattr(sub, "_compiled_call_impl", None) is not None:
            sub._compiled_call_impl = None
