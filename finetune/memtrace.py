"""Counting the accelerator memory of a step that runs on meta tensors: which bytes are alive, and at the peak.

Tensors on the meta device have shapes, dtypes and storages of a size, but no data, so a whole training step runs
on them in about the time Python takes to dispatch its operators. Two torch modes make that run behave, memory-wise,
like the same step on the target device:

- `LiveBytes` (a `TorchDispatchMode`, below autograd) registers every new meta storage an operator creates, adds its
  `nbytes()` to the live total and subtracts it when the storage is freed (a weakref finalizer on the storage):
  exactly the tensors autograd keeps for backward, the optimizer's state and the temporaries, as they come and go.
  Each live storage carries a category (weights, gradients, optimizer state, activations, ...) so the peak can be
  told apart.
- `TargetDevice` (a `TorchFunctionMode`, above autograd) does what the device would do differently from the meta
  device: attention goes through the fused kernel the device picks (flash or memory-efficient on CUDA, the flash
  kernel on CPU; the meta device would otherwise take the math path and keep the whole attention matrix), and
  mixed precision follows the device's autocast policy (which operators run in the low precision, which in fp32),
  with autocast's cache of cast weights. Autocast itself only acts on CPU and CUDA tensors, so its policy is
  written here, from torch's own lists (`aten/src/ATen/autocast_mode.cpp`; the test holds the CUDA table against
  `torch.testing._internal.autocast_test_lists`).

What this cannot see is device-specific and is added by the planner as named margins: the CUDA context, cuBLAS and
cuDNN workspaces, and the caching allocator's rounding and fragmentation.
"""

from __future__ import annotations

import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

ACTIVATIONS = "activations and temporaries"

# Autocast's policies by device (torch's autocast_mode.cpp): operators that run in the low precision, and those
# that run in fp32 whatever their inputs. Operators outside both run in their inputs' dtype, as without autocast.
LOW_PRECISION = {
    "cuda": (
        "conv1d", "conv2d", "conv3d", "conv_tbc", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
        "convolution", "_convolution", "prelu", "addmm", "addmv", "addr", "matmul", "einsum", "mm", "mv",
        "chain_matmul", "addbmm", "baddbmm", "bmm", "linear", "__matmul__", "__rmatmul__", "linalg_vecdot",
        "multi_dot", "scaled_dot_product_attention",
    ),
    "cpu": (
        "conv1d", "conv2d", "conv3d", "bmm", "mm", "linalg_vecdot", "baddbmm", "addmm", "addbmm", "linear",
        "_convolution", "matmul", "conv_tbc", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "prelu",
        "__matmul__", "__rmatmul__", "scaled_dot_product_attention",
    ),
}  # fmt: skip
FP32 = {
    "cuda": (
        "acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p", "reciprocal", "rsqrt",
        "sinh", "tan", "pow", "__pow__", "__rpow__", "softmax", "log_softmax", "layer_norm", "rms_norm",
        "group_norm", "norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss",
        "hinge_embedding_loss", "kl_div", "margin_ranking_loss", "triplet_margin_loss",
        "binary_cross_entropy_with_logits", "cumprod", "cumsum", "dist", "pdist", "cdist", "prod", "renorm", "sum",
        "logsumexp", "softplus", "nll_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "mse_loss",
        "multilabel_margin_loss", "soft_margin_loss", "multi_margin_loss",
    ),
    "cpu": (
        "avg_pool3d", "binary_cross_entropy", "grid_sampler", "polar", "prod", "quantile", "nanquantile", "stft",
        "cdist", "trace", "view_as_complex", "cholesky", "inverse", "pinverse", "max_pool3d", "adaptive_avg_pool3d",
        "reflection_pad1d", "reflection_pad2d", "replication_pad1d", "replication_pad2d", "replication_pad3d",
        "mse_loss", "cosine_embedding_loss", "nll_loss", "hinge_embedding_loss", "poisson_nll_loss",
        "smooth_l1_loss", "l1_loss", "huber_loss", "margin_ranking_loss", "soft_margin_loss", "triplet_margin_loss",
        "multi_margin_loss", "binary_cross_entropy_with_logits", "kl_div",
    ),
}  # fmt: skip
DEVICE_TYPES = tuple(LOW_PRECISION)


def _callables(names: tuple[str, ...]) -> set:
    """The torch callables a `TorchFunctionMode` sees for operator `names`: functions, `F.` functions, methods."""
    out = set()
    for name in names:
        for namespace in (torch, F, torch.Tensor, torch.linalg):
            fn = getattr(namespace, name, None)
            if callable(fn):
                out.add(fn)
    return out


_FRESH: dict = {}  # operator -> whether it returns fresh tensors only (no views of its inputs, no writes)
_OUTPUTS: dict = {}  # (operator, its inputs' signatures) -> its outputs' specs; meta outputs depend on nothing else


class _TensorSpec(tuple):
    """(shape, stride, dtype) of a meta tensor an operator returned."""


def _signature(x):
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.stride(), x.dtype)
    return x if isinstance(x, (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format,
                                torch.layout)) else repr(x)  # fmt: skip


def _spec(x):
    return _TensorSpec((tuple(x.shape), x.stride(), x.dtype)) if isinstance(x, torch.Tensor) else x


def _make(x):
    if isinstance(x, _TensorSpec):
        shape, stride, dtype = x
        return torch.empty_strided(shape, stride, dtype=dtype, device="meta")
    return x


@dataclass
class Snapshot:
    """Live bytes, in total and by category, at one moment; `phase` names the part of the step it fell in."""

    total: int = 0
    by_category: dict[str, int] = field(default_factory=dict)
    phase: str = ""


def _all_valid(func, args):
    """What a data-dependent operator gives on meta tensors when every mask is all true, as the planner's token ids
    are (`plan_models.ShapeTokenizer`): a boolean mask's `all()` read in Python is True, and indexing by a boolean
    mask keeps every position. None for any other call."""
    if func is torch.ops.aten._local_scalar_dense.default and args[0].device.type == "meta":
        if args[0].dtype == torch.bool:
            return True
        raise RuntimeError("a value read from a meta tensor: the planner traces shapes, not values")
    if func is torch.ops.aten.index.Tensor and args[0].device.type == "meta":
        x, indices = args
        if len(indices) == 1 and indices[0] is not None and indices[0].dtype == torch.bool:
            mask = indices[0]  # (leading dims of x): every position kept, flattened
            return x.new_empty((mask.numel(), *x.shape[mask.dim() :]))
    return None


class FastMeta(TorchDispatchMode):
    """Operators on meta tensors, with their outputs remembered (see `_run`)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return self._run(func, args, kwargs or {})

    def _run(self, func, args, kwargs):
        """`func(*args, **kwargs)`, remembering what a fresh-output operator returns for inputs of given shapes,
        strides and dtypes: most meta kernels are Python reference code (a millisecond an operator), and a model's
        repeated blocks call the same operators on the same shapes again and again. Operators that return views
        of their inputs or write into them always run."""
        masked = _all_valid(func, args)
        if masked is not None:
            return masked
        fresh = _FRESH.get(func)
        if fresh is None:
            schema = func._schema
            fresh = not schema.is_mutable and all(r.alias_info is None for r in schema.returns)
            _FRESH[func] = fresh
        if not fresh:
            return func(*args, **kwargs)
        leaves, _ = tree_flatten((args, kwargs))
        if any(isinstance(x, torch.Tensor) and x.device.type != "meta" for x in leaves):
            return func(*args, **kwargs)
        key = (func, *(_signature(x) for x in leaves))
        spec = _OUTPUTS.get(key)
        if spec is None:
            out = func(*args, **kwargs)
            flat, tree = tree_flatten(out)
            if all(x.device.type == "meta" for x in flat if isinstance(x, torch.Tensor)):
                _OUTPUTS[key] = ([_spec(x) for x in flat], tree)
            return out
        flat, tree = spec
        return tree_unflatten([_make(x) for x in flat], tree)


class LiveBytes(FastMeta):
    """Live bytes of meta storages, by category, and the peak (with its breakdown) since the last `reset_peak`."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, list] = {}  # storage address -> [nbytes, category]
        self.by_category: Counter[str] = Counter()
        self.total = 0
        self.category = ACTIVATIONS  # of storages created from now on
        self.phase = ""
        self.peak = Snapshot()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = self._run(func, args, kwargs or {})
        for t in tree_flatten(out)[0]:
            self.track(t)
        return out

    def track(self, t, category: str | None = None) -> None:
        """Counts `t`'s storage (once, however many tensors view it) under `category` or the current one."""
        if not isinstance(t, torch.Tensor) or t.device.type != "meta":
            return
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self.live:
            if category is not None:
                self.retag(t, category)
            return
        nbytes = storage.nbytes()
        self.live[key] = [nbytes, category or self.category]
        self.by_category[category or self.category] += nbytes
        self.total += nbytes
        weakref.finalize(storage, self._free, key).atexit = False  # nothing to count once the process ends
        if self.total > self.peak.total:
            self.peak = Snapshot(self.total, dict(self.by_category), self.phase)

    def retag(self, t: torch.Tensor, category: str) -> None:
        """Moves `t`'s storage (already counted) to `category`."""
        entry = self.live.get(t.untyped_storage()._cdata)
        if entry is None:
            return self.track(t, category)
        self.by_category[entry[1]] -= entry[0]
        self.by_category[category] += entry[0]
        entry[1] = category

    def untrack(self, *tensors: torch.Tensor) -> None:
        """Stops counting the storages of `tensors` (moved off the device)."""
        for t in tensors:
            self._free(t.untyped_storage()._cdata)

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        if entry is not None:
            self.by_category[entry[1]] -= entry[0]
            self.total -= entry[0]

    def now(self) -> Snapshot:
        return Snapshot(self.total, dict(self.by_category), self.phase)

    def reset_peak(self) -> None:
        self.peak = self.now()

    @contextmanager
    def tagged(self, category: str, phase: str | None = None) -> Iterator[None]:
        """New storages are counted under `category` (and the peak is said to fall in `phase`) for the duration."""
        saved = self.category, self.phase
        self.category, self.phase = category, phase if phase is not None else self.phase
        try:
            yield
        finally:
            self.category, self.phase = saved


class TargetDevice(TorchFunctionMode):
    """The target device's attention kernel and autocast policy for a step run on meta tensors.

    `autocast(dtype)` is the emulated `torch.autocast(device_type, dtype)`: inside it the device's low-precision
    operators cast their floating-point inputs to `dtype` and its fp32 operators cast low-precision inputs to fp32;
    the casts of trainable leaf tensors (parameters) are cached for the region, as autocast's are."""

    def __init__(self, device_type: str):
        super().__init__()
        if device_type not in DEVICE_TYPES:
            raise ValueError(f"device_type {device_type!r}: one of {DEVICE_TYPES}")
        self.device_type = device_type
        self.low = _callables(LOW_PRECISION[device_type])
        self.fp32 = _callables(FP32[device_type])
        self.dtype: torch.dtype | None = None  # the autocast dtype; None: autocast off
        self.cache: dict[int, torch.Tensor] = {}

    @contextmanager
    def autocast(self, dtype: torch.dtype | None) -> Iterator[None]:
        """Autocast to `dtype` for the duration (None or fp32: off); the outermost region owns the cast cache."""
        saved = self.dtype
        self.dtype = dtype if dtype not in (None, torch.float32) else None
        try:
            yield
        finally:
            self.dtype = saved
            if saved is None:
                self.cache.clear()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.dtype is not None:
            if func in self.low:
                args, kwargs = self._cast(args, kwargs, lambda t: t.dtype in (torch.float32, torch.float16,
                                                                              torch.bfloat16), self.dtype)  # fmt: skip
            elif func in self.fp32:
                args, kwargs = self._cast(args, kwargs, lambda t: t.dtype in (torch.float16, torch.bfloat16),
                                          torch.float32)  # fmt: skip
        if func is F.scaled_dot_product_attention:
            return self.attention(*args, **kwargs)
        return func(*args, **kwargs)

    def _cast(self, args, kwargs, eligible: Callable[[torch.Tensor], bool], dtype: torch.dtype):
        def cast(t):
            if not isinstance(t, torch.Tensor) or not eligible(t) or t.dtype == dtype:
                return t
            if t.is_leaf and t.requires_grad:  # autocast caches the casts of parameters for the region
                if id(t) not in self.cache:
                    self.cache[id(t)] = t.to(dtype)
                return self.cache[id(t)]
            return t.to(dtype)

        return tree_map(cast, args), tree_map(cast, kwargs)

    def attention(self, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                  enable_gqa=False) -> torch.Tensor:  # fmt: skip
        """`F.scaled_dot_product_attention` through the fused kernel this device would pick: each keeps the output
        and its log-sum-exp for backward, never the (L x S) attention matrix."""
        if enable_gqa and key.shape[-3] != query.shape[-3]:  # grouped-query: the kernels want as many key heads
            repeats = query.shape[-3] // key.shape[-3]
            key, value = key.repeat_interleave(repeats, -3), value.repeat_interleave(repeats, -3)
        aten = torch.ops.aten
        if self.device_type == "cpu":
            return aten._scaled_dot_product_flash_attention_for_cpu(
                query, key, value, dropout_p, is_causal, attn_mask=attn_mask, scale=scale
            )[0]
        flash = query.dtype in (torch.float16, torch.bfloat16) and attn_mask is None and query.shape[-1] <= 256
        if flash:
            return aten._scaled_dot_product_flash_attention(query, key, value, dropout_p, is_causal, scale=scale)[0]
        bias = attn_mask
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # the kernel takes an additive bias
            bias = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(~attn_mask, float("-inf"))
        return aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, dropout_p, is_causal,
                                                            scale=scale)[0]  # fmt: skip


def autocast_forward(module: torch.nn.Module, autocast, dtype: torch.dtype) -> None:
    """Wraps `module.forward` as accelerate's `prepare` does under mixed precision: the forward under
    `autocast(dtype)` (`TargetDevice.autocast`, or `torch.autocast` on a real device), its floating-point outputs
    returned in fp32 (accelerate's `convert_outputs_to_fp32`)."""
    if dtype == torch.float32:
        return
    forward = module.forward

    def autocast_then_fp32(*args, **kwargs):
        with autocast(dtype):
            out = forward(*args, **kwargs)
        return tree_map(lambda t: t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t, out)

    module.forward = autocast_then_fp32


def recompute_on_target(module: torch.nn.Module, device: TargetDevice) -> None:
    """Gradient checkpointing recomputes a block in the backward pass, where neither torch function modes nor the
    forward's autocast region are active: torch's checkpoint restores a real autocast state there, so the target
    device's mode and its emulated autocast state are restored the same way."""
    for sub in module.modules():
        run = getattr(sub, "_gradient_checkpointing_func", None)
        if run is None or getattr(run, "_on_target", False):
            continue

        def on_target(fn, *args, _run=run, **kwargs):
            dtype = device.dtype

            def recompute(*a, **k):
                active = device in _get_current_function_mode_stack()
                with nullcontext() if active else device, device.autocast(dtype):
                    return fn(*a, **k)

            return _run(recompute, *args, **kwargs)

        on_target._on_target = True
        sub._gradient_checkpointing_func = on_target
