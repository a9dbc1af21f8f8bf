"""The step options (finetune/speed.py): compiled training is the same training, a failed compile falls back to
eager with one warning, channels-last and fused AdamW change no result, and bad combinations are one-line errors."""

from __future__ import annotations

import logging

import pytest
import torch

from difftune.core.config import compose, from_values
from difftune.core.errors import UserError
from difftune.finetune import speed
from difftune.finetune.adapters import AdapterConfig, adapter_config, add_adapter
from difftune.finetune.config import LoraTrainConfig
from difftune.finetune.loop import train
from difftune.finetune.tasks import LORA
from difftune.toyworld.tiny import build_pipeline


def run(tiny_sd1, shapes_dir, out, **kw):
    values = dict(
        pretrained_model_name_or_path=str(tiny_sd1), train_data_dir=str(shapes_dir), output_dir=str(out),
        resolution=32, center_crop=True, train_batch_size=4, learning_rate=1e-3, report_to="none", seed=1,
        checkpointing_steps=10**6,
    )  # fmt: skip
    return train(from_values(LoraTrainConfig, {**values, **kw}), LORA)


def test_compiled_training_follows_the_eager_loss_curve(tiny_sd1, shapes_dir, tmp_path):
    """50 micro-steps through the product's loop, with gradient checkpointing and accumulation: inductor's kernels
    reorder float sums, so the curves agree to float tolerance, not bit for bit."""
    kw = dict(max_train_steps=25, gradient_accumulation_steps=2, gradient_checkpointing=True)
    eager = run(tiny_sd1, shapes_dir, tmp_path / "eager", **kw)
    compiled = run(tiny_sd1, shapes_dir, tmp_path / "compiled", compile=True, **kw)
    assert len(compiled.losses) == 25
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-3, abs=1e-5)
    assert eager.losses[0] != eager.losses[-1]  # the runs trained: the comparison is not of two constants


def lora_unet():
    torch.manual_seed(0)
    unet = build_pipeline("test").unet
    unet.requires_grad_(False)
    add_adapter(unet, adapter_config(AdapterConfig(rank=4), ["to_q", "to_k", "to_v", "to_out.0"]))
    return unet


def inputs():
    torch.manual_seed(1)
    return torch.randn(2, 4, 16, 16), torch.tensor([10, 500]), torch.randn(2, 16, 16)


def failing_backend(graph, example_inputs):
    raise RuntimeError("no C++ compiler found (test)")


@pytest.mark.parametrize("scope", ["blocks", "model"])
def test_a_failed_compile_falls_back_to_eager_with_one_warning(scope, caplog):
    reference = lora_unet()(*inputs()).sample
    unet = lora_unet()
    speed.compile_denoiser(unet, scope, backend=failing_backend)
    with caplog.at_level(logging.WARNING, logger="difftune.finetune.speed"):
        first = unet(*inputs()).sample
        second = unet(*inputs()).sample
    warnings = [r.getMessage() for r in caplog.records if r.name == "difftune.finetune.speed"]
    assert len(warnings) == 1 and "no C++ compiler found" in warnings[0] and "eagerly" in warnings[0]
    torch.testing.assert_close(first, reference)
    torch.testing.assert_close(second, reference)
    assert not any(getattr(m, "_compiled_call_impl", None) for m in unet.modules())


def test_an_error_of_the_model_itself_is_raised_without_a_compile_warning(caplog):
    unet = lora_unet()
    speed.compile_denoiser(unet, "model", backend=failing_backend)
    latents, t, _ = inputs()
    with caplog.at_level(logging.WARNING, logger="difftune.finetune.speed"), pytest.raises(RuntimeError, match="mat1"):
        unet(latents, t, torch.randn(2, 16, 5))  # wrong text width: eager PyTorch fails too
    assert not [r for r in caplog.records if r.name == "difftune.finetune.speed"]


def test_blocks_scope_compiles_only_the_repeated_blocks():
    unet = lora_unet()
    assert speed.compile_denoiser(unet, "blocks", backend="eager") == "blocks"
    compiled = {type(m).__name__ for m in unet.modules() if getattr(m, "_compiled_call_impl", None)}
    assert compiled == {"BasicTransformerBlock"}
    unet(*inputs())


def test_channels_last_and_fused_adamw_change_no_result(tiny_sd1, shapes_dir, tmp_path):
    plain = run(tiny_sd1, shapes_dir, tmp_path / "plain", max_train_steps=3)
    fast = run(tiny_sd1, shapes_dir, tmp_path / "fast", max_train_steps=3, channels_last=True, fused_optimizer=True)
    assert fast.losses == pytest.approx(plain.losses, rel=1e-4)


def test_channels_last_applies_to_convolution_weights():
    unet = lora_unet()
    speed.speed_up_denoiser(unet, compile=False, channels_last=True)
    conv = unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_fused_optimizer_is_adamw_only():
    with pytest.raises(UserError, match="--fused_optimizer .*--optimizer adafactor"):
        compose(
            LoraTrainConfig,
            dict(
                pretrained_model_name_or_path="base", train_data_dir="d", fused_optimizer=True, optimizer="adafactor"
            ),
        ).validate()
