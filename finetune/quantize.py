"""The frozen denoiser loaded 4-bit (NF4) or 8-bit for QLoRA-style training on small GPUs (`--quantize_base nf4|int8`).

QLoRA (Dettmers et al. 2023): the base weights are stored as 4-bit NormalFloat with double quantisation and
dequantised on the fly to `compute_dtype` in each matmul; only the LoRA weights, kept in full precision, are
trained. The quantisation is bitsandbytes' through diffusers' `BitsAndBytesConfig`, for any family: the class the
pipeline's `model_index.json` names for its denoiser (a UNet, or an SD 3, Flux or newer transformer) is loaded with
the config, which replaces its `nn.Linear` layers (attention and feed-forward: most of SDXL's weights, nearly all of
a transformer's) and keeps the layers diffusers' quantizer keeps (the output projection), while convolutions stay
in `compute_dtype`. bitsandbytes' quantised layers need a CUDA GPU, so every check here runs before anything is
loaded.
"""

from __future__ import annotations

import os

import torch

from difftune.core.errors import UserError
from difftune.finetune.planner import checks_this_machine

MODES = ("nf4", "int8")


def cuda_available() -> bool:
    """Whether training will run on CUDA: a GPU is visible and accelerate was not told to use the CPU."""
    forced_cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return torch.cuda.is_available() and not forced_cpu


def check_quantize(mode: str) -> None:
    """One-line UserError when `--quantize_base mode` cannot run on this machine."""
    if mode not in MODES:
        raise UserError(f"--quantize_base {mode!r}: unknown; choose one of {', '.join(MODES)}")
    if not checks_this_machine():
        return
    if not cuda_available():
        raise UserError(
            f"--quantize_base {mode} needs a CUDA GPU (bitsandbytes' 4/8-bit layers); drop it on this machine"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise UserError(f"--quantize_base {mode} needs bitsandbytes: pip install 'difftune[bnb]'") from err


def quantization_config(mode: str, compute_dtype: torch.dtype):
    """diffusers' `BitsAndBytesConfig` for `mode`: NF4 with double quantisation (QLoRA's), or LLM.int8()."""
    from diffusers import BitsAndBytesConfig

    if mode == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )  # fmt: skip
    if mode == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise UserError(f"--quantize_base {mode!r}: unknown; choose one of {', '.join(MODES)}")


def load_quantized(model: str, subfolder: str, mode: str, compute_dtype: torch.dtype):
    """The pipeline's denoiser (`subfolder`: unet or transformer) with its linear layers quantised (`mode` nf4 |
    int8), frozen, on the current CUDA device.

    Its other weights are `compute_dtype`. Attach the adapter afterwards as usual (peft wraps bitsandbytes layers);
    do not `.to(dtype)` the result: that would try to cast the packed 4/8-bit weights.
    """
    check_quantize(mode)
    from difftune.pipelines.families import read_model_index
    from difftune.pipelines.families.base import component_class

    cls = component_class(read_model_index(model), subfolder, model)
    denoiser = cls.from_pretrained(
        model, subfolder=subfolder, quantization_config=quantization_config(mode, compute_dtype),
        torch_dtype=compute_dtype,
    )  # fmt: skip
    denoiser.requires_grad_(False)
    return denoiser
