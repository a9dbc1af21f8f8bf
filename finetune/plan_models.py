"""A training run's models without their weights: each part built on the meta device from its config file alone.

The memory planner (`finetune.planner`) needs the exact modules a run trains, with their shapes and dtypes, and no
bytes: `make_part` builds a component from `<model>/<name>/config.json` (a folder, or a Hub id, whose config files
alone are fetched), `ShapeTokenizer` stands in for a tokenizer (token ids of the right length, all zeros). What
runs only on a CUDA machine with bitsandbytes has a stand-in of the same memory: `PackedLinear` for the 4/8-bit
linear layers of a quantised base, `StandInAdamW8bit` for the 8-bit optimizer, `StandInProdigy` for Prodigy (whose
step reads values). `device="cpu"` builds the same parts with random weights, for measuring the step they plan.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from difftune.core.errors import UserError
from difftune.pipelines.families.base import sub_config

NO_LIMIT = 1 << 20  # tokens


class ShapeTokenizer:
    """A tokenizer that gives all-zero token ids of the length asked for, every position valid: the planned step
    reads their shape only, and a text at its longest is the costliest. LLM families' chat templates give the text
    back unchanged (or, tokenized, the ids)."""

    def __init__(self, model_max_length: int):
        self.model_max_length = model_max_length

    def __call__(self, texts, padding=None, max_length=None, truncation=None, return_tensors=None, **_):
        length = max_length or self.model_max_length
        return _Ids(torch.zeros(len(texts), length, dtype=torch.long))

    def apply_chat_template(self, conversations, tokenize=True, return_dict=False, max_length=None, **_):
        batch = conversations if conversations and isinstance(conversations[0], list) else [conversations]
        if not tokenize:
            texts = ["" for _ in batch]
            return texts if batch is conversations else texts[0]
        ids = self(batch, max_length=max_length)
        return {"input_ids": ids.input_ids, "attention_mask": ids.attention_mask} if return_dict else ids.input_ids


class _Ids:
    def __init__(self, input_ids: torch.Tensor):
        self.input_ids = input_ids
        self.attention_mask = torch.ones_like(input_ids)


def check_configs(model: str, index: dict, family_cls) -> None:
    """One line naming the first config file the plan needs and the pipeline lacks: the scheduler's and that of
    every component with weights (absent optional parts excepted)."""
    names = [("scheduler", "scheduler_config.json")]
    for name in ("vae", family_cls.denoiser_name, *family_cls.text_encoder_names):
        if (index.get(name) or [None])[0] is not None or name not in family_cls.optional_parts:
            names.append((name, "config.json"))
    for name, filename in names:
        if not sub_config(model, name, filename):
            raise UserError(
                f"{model}: no {name}/{filename}; the planner builds each part of the pipeline from its config file"
            )


def make_part(model: str, device: str = "meta", weights: bool = False) -> Callable[[str, type], object]:
    """`Family.load`'s `make_part`: each component built from its config on `device`; tokenizers become
    `ShapeTokenizer`s. `weights` (on the CPU): the components load their saved weights instead of random ones (the
    planner's benchmark measures a shipped base as it trains: SD 3's T5 stand-in is defined by its zero weights)."""

    def build(name: str, cls: type):
        if weights and not name.startswith("tokenizer"):
            return cls.from_pretrained(model, subfolder=name)
        if name.startswith("tokenizer"):  # its limit, else its encoder's positions (T5's relative ones have none)
            limit = sub_config(model, name, "tokenizer_config.json").get("model_max_length")
            encoder = sub_config(model, name.replace("tokenizer", "text_encoder"))
            return ShapeTokenizer(int(limit or encoder.get("max_position_embeddings") or NO_LIMIT))
        config = sub_config(model, name)
        with torch.device(device):
            if hasattr(cls, "from_config"):  # diffusers
                part = cls.from_config(config)
            else:  # transformers
                part = cls(cls.config_class.from_dict(config))
        return part

    return build


# ----------------------------------------------------------------------------------------------- quantised base

NF4_BLOCK, NESTED_BLOCK = 64, 256  # bitsandbytes' NF4 block size and its double quantisation's


class _DequantizedMatmul(torch.autograd.Function):
    """bitsandbytes' 4/8-bit matmul, memory-wise: the weight is dequantised into a temporary for the matmul, and
    again in the backward pass; only the packed weight is kept for backward."""

    @staticmethod
    def forward(ctx, x, packed, shape, bias):
        ctx.shape = shape
        ctx.save_for_backward(packed)
        weight = x.new_empty(shape)  # (out, in), the dequantised copy
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        weight = grad.new_empty(ctx.shape)
        return grad @ weight, None, None, None


class PackedLinear(nn.Linear):
    """Where bitsandbytes' `Linear4bit` (NF4 with double quantisation, QLoRA's) or `Linear8bitLt` (LLM.int8())
    would be: the packed weight and its quantisation state, and the dequantising matmul's temporaries."""

    def __init__(self, linear: nn.Linear, mode: str, compute_dtype: torch.dtype):
        nn.Module.__init__(self)
        self.in_features, self.out_features, self.compute_dtype = (
            linear.in_features,
            linear.out_features,
            compute_dtype,
        )
        n = self.in_features * self.out_features
        device = linear.weight.device
        if mode == "nf4":
            packed = torch.empty((n + 1) // 2, 1, dtype=torch.uint8, device=device)
            blocks = math.ceil(n / NF4_BLOCK)
            self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8, device=device))
            self.register_buffer("nested_absmax", torch.empty(math.ceil(blocks / NESTED_BLOCK), device=device))
        else:  # int8: one fp32 scale per output row
            packed = torch.empty(self.out_features, self.in_features, dtype=torch.int8, device=device)
            self.register_buffer("scales", torch.empty(self.out_features, device=device))
        self.weight = nn.Parameter(packed, requires_grad=False)
        bias = linear.bias
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(compute_dtype), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = (self.out_features, self.in_features)
        return _DequantizedMatmul.apply(x.to(self.compute_dtype), self.weight, shape, self.bias)


def quantize_stand_in(model: nn.Module, mode: str, compute_dtype: torch.dtype) -> nn.Module:
    """`model` as diffusers' `BitsAndBytesConfig` loads it: every linear layer packed (but those the model keeps
    in fp32), the other weights in `compute_dtype`, frozen."""
    keep = list(getattr(model, "_keep_in_fp32_modules", None) or [])
    model.to(compute_dtype)
    for name, module in list(model.named_modules()):
        if type(module) is not nn.Linear or any(k == name or f"{k}." in f"{name}." for k in keep):
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, PackedLinear(module, mode, compute_dtype))
    model.requires_grad_(False)
    return model


# ----------------------------------------------------------------------------------------------- optimizers


class StandInAdamW8bit(torch.optim.Optimizer):
    """bitsandbytes' `AdamW8bit`, memory-wise: tensors of 4,096 values or more keep both moments as uint8 with one
    fp32 scale per 256-value block, smaller ones in fp32; the update runs in place (a CUDA kernel)."""

    MIN_8BIT_SIZE, BLOCK = 4096, 256

    def __init__(self, params, lr: float = 1e-3, **_):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    if p.numel() >= self.MIN_8BIT_SIZE:
                        for k in ("state1", "state2"):
                            state[k] = torch.zeros_like(p, dtype=torch.uint8)
                            state[f"absmax{k[-1]}"] = p.new_zeros(
                                math.ceil(p.numel() / self.BLOCK), dtype=torch.float32
                            )
                    else:
                        state["state1"], state["state2"] = torch.zeros_like(p), torch.zeros_like(p)
                p.add_(p.grad, alpha=-group["lr"])
        return None


class StandInProdigy(torch.optim.Optimizer):
    """Prodigy (prodigyopt), memory-wise: four tensors of each parameter's size (both moments, `s`, the initial
    weights `p0`) and one parameter-sized temporary at a time in the step."""

    def __init__(self, params, lr: float = 1.0, **_):
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state.update(exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p), s=torch.zeros_like(p),
                                 p0=p.detach().clone())  # fmt: skip
                delta = state["p0"] - p  # the step's temporary
                p.add_(delta, alpha=-group["lr"])
        return None


STAND_IN_OPTIMIZERS = {"adamw8bit": StandInAdamW8bit, "prodigy": StandInProdigy}
