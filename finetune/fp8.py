"""fp8 base (`--fp8_base`): the frozen denoiser's linear weights stored as float8 (e4m3) and computed in the
compute precision, half the memory of bf16 weights.

Each frozen `nn.Linear` of the denoiser (the base layer inside a peft adapter layer included; the adapter's own
layers, which train, never) becomes an `Fp8Linear`: its weight W stored as float8_e4m3fn W / s with one float32
scale per output row, s = max|W_row| / 448, so every row uses e4m3's whole range (a per-tensor scale would flush
the small rows of a layer with one large row). Its forward dequantises W into the compute dtype (the autocast
dtype, else the input's), multiplies, and saves only the float8 weight and the scales for the backward, which
dequantises again for the input's gradient: no full-precision copy of a weight outlives its layer's call, with or
without gradient checkpointing. The layers the model declares precision-sensitive stay as they are, as in
diffusers' own layerwise casting: names matching diffusers' default patterns (norms and their modulation linears,
position and patch embeddings, `proj_in`/`proj_out`), the model's `_skip_layerwise_casting_patterns` and its
`_keep_in_fp32_modules`. Everything here works on meta tensors (no data-dependent branch), so the memory planner
can trace it.

Why not diffusers' layerwise casting (`ModelMixin.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
compute_dtype=torch.bfloat16)`): checked here with peft adapters, it is an inference tool. It recasts a layer's
weights in place around each call, so under gradient checkpointing the recomputation fails torch's check that
recomputed tensors match the forward's (`CheckpointError`, a UNet); DoRA reads its base layer's weight outside that
call and meets float8 ("Promotion for Float8 Types is not supported"); and without checkpointing autograd keeps
each layer's upcast copy for the backward (42 of a tiny Flux's 45 cast layers), more memory than bf16 weights.
torchao's float8 weight-only tensors would be a new dependency made for inference.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448
# diffusers' default layerwise-casting skip patterns (diffusers.hooks.layerwise_casting.DEFAULT_SKIP_MODULES_PATTERN)
DEFAULT_SKIP = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$")


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`weight` (out, in) as float8 e4m3 (out, in) and float32 row scales (out, 1): weight ~ fp8 * scale."""
    w = weight.detach().float()
    scale = (w.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)
    return (w / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3), scale


def dequantize(w8: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return w8.to(dtype) * scale.to(dtype)


class _Fp8Linear(torch.autograd.Function):
    """y = x W^T + b with W dequantised from float8; the backward keeps the float8 weight, not a dequantised copy.
    The weight and bias are frozen: only the input's gradient is returned."""

    @staticmethod
    def forward(ctx, x, w8, scale, bias, dtype):
        ctx.save_for_backward(w8, scale)
        ctx.input_dtype = x.dtype
        return F.linear(x.to(dtype), dequantize(w8, scale, dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad):  # grad (..., out) -> (..., in)
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        w8, scale = ctx.saved_tensors
        return (grad @ dequantize(w8, scale, grad.dtype)).to(ctx.input_dtype), None, None, None, None


class Fp8Linear(nn.Module):
    """A frozen linear layer whose weight is stored float8 e4m3 with row scales (buffers `weight_fp8`,
    `weight_scale`). `weight` reads the dequantised weight in the original dtype, for code that reads a base
    layer's weight (peft's DoRA)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        w8, scale = quantize(linear.weight)
        self.register_buffer("weight_fp8", w8)
        self.register_buffer("weight_scale", scale)
        self.register_parameter("bias", linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        return dequantize(self.weight_fp8, self.weight_scale, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = x.device.type
        autocast = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
        dtype = torch.get_autocast_dtype(device) if autocast else x.dtype
        return _Fp8Linear.apply(x, self.weight_fp8, self.weight_scale, self.bias, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def skip_patterns(model: nn.Module) -> tuple[str, ...]:
    """The names the model keeps in full precision: its layerwise-casting skip patterns and fp32 modules."""
    declared = getattr(model, "_skip_layerwise_casting_patterns", None) or ()
    return (*DEFAULT_SKIP, *declared, *(getattr(model, "_keep_in_fp32_modules", None) or ()))


def to_fp8(model: nn.Module) -> int:
    """Replaces every frozen linear layer of `model` outside its skip patterns by an `Fp8Linear`; returns how many.
    A peft layer's base is named by its wrapper's path (`to_q.base_layer` matches as `to_q`)."""
    patterns = skip_patterns(model)
    targets = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or any(p.requires_grad for p in module.parameters()):
            continue
        path = name.removesuffix(".base_layer")
        if not any(re.search(pattern, path) for pattern in patterns):
            targets.append(name)
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, Fp8Linear(getattr(parent, child)))
    return len(targets)
