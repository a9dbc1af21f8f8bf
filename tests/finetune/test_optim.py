"""Optimizers by name, and the start-up checks for 8-bit optimizers, Prodigy and the quantised base."""

from __future__ import annotations

import importlib.metadata
import sys
import types

import pytest
import torch

from difftune.core.config import compose
from difftune.core.errors import UserError
from difftune.finetune import optim, quantize
from difftune.finetune.config import LoraTrainConfig


def cfg(**kwargs) -> optim.OptimizerConfig:
    return compose(LoraTrainConfig, dict(pretrained_model_name_or_path="base", train_data_dir="data", **kwargs)).optim


def params() -> list[torch.nn.Parameter]:
    return list(torch.nn.Linear(8, 4).parameters())


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_adamw_takes_lr_and_adam_settings():
    opt = optim.build_optimizer(
        cfg(adam_beta1=0.8, adam_beta2=0.95, adam_weight_decay=0.05, adam_epsilon=1e-6), params(), 3e-4
    )
    group = opt.param_groups[0]
    assert type(opt) is torch.optim.AdamW
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (3e-4, (0.8, 0.95), 0.05, 1e-6)


def test_adafactor_uses_the_given_lr_not_a_relative_step():
    from transformers.optimization import Adafactor

    p = params()
    opt = optim.build_optimizer(cfg(optimizer="adafactor"), p, 2e-3)
    group = opt.param_groups[0]
    assert isinstance(opt, Adafactor)
    assert group["lr"] == 2e-3 and group["relative_step"] is False and group["scale_parameter"] is False
    # A fixed step: the first update of a weight moves it by about lr (times the update's RMS clip of 1).
    before = p[0].detach().clone()
    p[0].grad = torch.ones_like(p[0])
    opt.step()
    assert (before - p[0].detach()).abs().max().item() == pytest.approx(2e-3, rel=0.05)


@pytest.mark.parametrize(
    "kwargs",
    [{"optimizer": "adamw8bit"}, {"use_8bit_adam": True}],
    ids=["optimizer", "use_8bit_adam"],
)
def test_8bit_adam_without_cuda_is_one_clear_line(no_cuda, kwargs):
    with pytest.raises(UserError, match=r"adamw8bit .*needs a CUDA GPU.*use --optimizer adamw") as err:
        optim.validate_optim(cfg(**kwargs))
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        optim.build_optimizer(cfg(**kwargs), params(), 1e-4)


def test_accelerate_use_cpu_counts_as_no_cuda(with_cuda, monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    with pytest.raises(UserError, match="needs a CUDA GPU"):
        optim.validate_optim(cfg(optimizer="adamw8bit"))


def test_8bit_adam_is_bitsandbytes_with_the_adam_settings(with_cuda):
    bnb = with_cuda
    opt = optim.build_optimizer(cfg(use_8bit_adam=True, adam_beta2=0.99, adam_weight_decay=0.1), params(), 5e-5)
    group = opt.param_groups[0]
    assert isinstance(opt, bnb.optim.AdamW8bit)
    assert (group["lr"], group["betas"], group["weight_decay"]) == (5e-5, (0.9, 0.99), 0.1)


def test_use_8bit_adam_contradicting_optimizer_is_an_error():
    with pytest.raises(UserError, match="--use_8bit_adam means --optimizer adamw8bit; it contradicts --optimizer"):
        optim.validate_optim(cfg(use_8bit_adam=True, optimizer="prodigy"))


def test_prodigy_missing_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "prodigyopt", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"--optimizer prodigy needs the prodigyopt package.*pip install prodigyopt"):
        optim.validate_optim(cfg(optimizer="prodigy"))


def test_prodigy_when_installed_gets_lr_and_adam_settings(monkeypatch):
    seen = {}

    class Prodigy(torch.optim.SGD):
        def __init__(self, params, lr, betas, weight_decay, eps):
            seen.update(lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
            super().__init__(params, lr=lr)

    monkeypatch.setitem(sys.modules, "prodigyopt", types.SimpleNamespace(Prodigy=Prodigy))
    opt = optim.build_optimizer(cfg(optimizer="prodigy"), params(), 1.0)
    assert isinstance(opt, Prodigy)
    assert seen == {"lr": 1.0, "betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-8}


def test_unknown_optimizer_lists_the_names():
    with pytest.raises(
        UserError, match=r"--optimizer 'lion': unknown; choose one of adamw, adamw8bit, prodigy, adafact"
    ):
        optim.build_optimizer(cfg(optimizer="lion"), params(), 1e-4)


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_quantize_base_without_cuda_stops_at_startup(no_cuda, mode):
    with pytest.raises(UserError, match=rf"--quantize_base {mode} needs a CUDA GPU") as err:
        compose(
            LoraTrainConfig, dict(pretrained_model_name_or_path="base", train_data_dir="data", quantize_base=mode)
        ).memory.validate()
    assert "\n" not in str(err.value)


def test_unknown_quantize_mode_is_named(with_cuda):
    from difftune.core.config import from_values

    with pytest.raises(
        UserError, match=r"--quantize_base fp4: unknown .did you mean .nf4.\?.; choose one of nf4, int8"
    ):
        from_values(LoraTrainConfig, {"train_data_dir": "data", "quantize_base": "fp4"})


def test_load_quantized_checks_before_loading_anything(no_cuda, monkeypatch, tmp_path):
    def fail(*args, **kwargs):
        raise AssertionError("from_pretrained must not be reached without CUDA")

    from diffusers import UNet2DConditionModel

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", fail)
    with pytest.raises(UserError, match="--quantize_base nf4 needs a CUDA GPU"):
        quantize.load_quantized(str(tmp_path / "no-such-model"), "unet", "nf4", torch.float16)


def test_load_quantized_passes_the_bitsandbytes_config(with_cuda, monkeypatch, tiny_sd1):
    """The CUDA path itself cannot run without a GPU; this checks what it hands to diffusers."""
    try:  # diffusers' BitsAndBytesConfig reads the installed package's version: the real extra is needed here
        importlib.metadata.version("bitsandbytes")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("bitsandbytes (the optional 'bnb' extra) is not installed")
    from diffusers import UNet2DConditionModel

    calls = []

    def fake_from_pretrained(name, **kwargs):
        calls.append((name, kwargs))
        return torch.nn.Linear(2, 2)

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", fake_from_pretrained)
    unet = quantize.load_quantized(str(tiny_sd1), "unet", "nf4", torch.bfloat16)
    ((name, kwargs),) = calls
    q = kwargs["quantization_config"]
    assert name == str(tiny_sd1) and kwargs["subfolder"] == "unet" and kwargs["torch_dtype"] is torch.bfloat16
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_use_double_quant
    assert q.bnb_4bit_compute_dtype is torch.bfloat16
    assert not any(p.requires_grad for p in unet.parameters())
    assert quantize.quantization_config("int8", torch.float16).load_in_8bit
