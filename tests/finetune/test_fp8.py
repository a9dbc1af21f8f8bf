"""fp8 base (`--fp8_base`): float8 storage with row scales, what is converted and what is not, a backward that
keeps no dequantised weight, every adapter and gradient checkpointing, the meta device, a LoRA trained on an fp8
base loading onto the full-precision base, and (slow) the embedded demo's accuracy against a full-precision run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from difftune.core.config import from_values
from difftune.core.errors import UserError
from difftune.finetune.config import FullTrainConfig, LoraTrainConfig
from difftune.finetune.fp8 import E4M3, Fp8Linear, dequantize, quantize, to_fp8
from difftune.finetune.loop import train
from difftune.finetune.tasks import LORA
from difftune.toyworld.tiny_denoisers import BUILDERS, example_loss


def test_row_scales_keep_every_row_within_e4m3_precision():
    torch.manual_seed(0)
    weight = torch.randn(8, 64) * torch.logspace(-4, 2, 8)[:, None]  # rows six orders of magnitude apart
    w8, scale = quantize(weight)
    assert w8.dtype == E4M3 and scale.shape == (8, 1)
    back = dequantize(w8, scale, torch.float32)
    relative = (back - weight).norm(dim=1) / weight.norm(dim=1)
    assert relative.max() < 0.04  # 3 mantissa bits: about 2-3% per row, for the smallest row too
    assert w8.float().abs().amax(dim=1).eq(448).all()  # each row uses the whole range


def test_frozen_linears_become_fp8_and_the_adapter_and_sensitive_layers_do_not(denoisers):
    model = denoisers.adapted("flux")
    dtypes = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    converted = to_fp8(model)
    names = {name for name, m in model.named_modules() if isinstance(m, Fp8Linear)}
    assert converted == len(names) > 0
    assert "transformer_blocks.0.attn.to_q.base_layer" in names  # the base inside peft's layer
    assert not any("lora_" in name or "norm" in name for name in names)  # adapter, and the model's skip patterns
    assert "proj_out" not in names
    assert {name: p.dtype for name, p in model.named_parameters() if p.requires_grad} == dtypes  # untouched


def test_the_backward_keeps_the_fp8_weight_not_a_dequantised_copy():
    layer = Fp8Linear(torch.nn.Linear(16, 32).requires_grad_(False))
    saved = []
    x = torch.randn(4, 16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert [t.dtype for t in saved] == [E4M3, torch.float32] and saved[0].shape == (32, 16)
    y.square().sum().backward()
    expected = torch.autograd.grad(torch.nn.functional.linear(x, layer.weight, layer.bias).square().sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)


@pytest.mark.parametrize(
    "kind, adapter, checkpointing",
    [("unet", "lora", True), ("flux", "dora", True), ("sd3", "loha", False), ("unet", "lokr", False)],
)
def test_adapters_train_on_an_fp8_base_close_to_the_full_precision_one(kind, adapter, checkpointing, denoisers):
    reference = denoisers.adapted(kind, adapter)
    model = denoisers.adapted(kind, adapter)
    for m in (reference, model):
        if checkpointing:
            m.enable_gradient_checkpointing()
    to_fp8(model)
    expected_loss, expected = denoisers.loss_and_grads(kind, reference)
    loss, grads = denoisers.loss_and_grads(kind, model)
    assert loss == pytest.approx(expected_loss.item(), rel=0.02)
    for name in expected:  # random tiny models amplify the 3% weight error; the direction holds
        assert torch.nn.functional.cosine_similarity(grads[name].flatten(), expected[name].flatten(), dim=0) > 0.95
    with torch.autocast("cpu", dtype=torch.bfloat16):  # computed in bf16 under autocast
        assert example_loss(kind, model).item() == pytest.approx(expected_loss.item(), rel=0.05)


def test_fp8_runs_on_the_meta_device():
    with torch.device("meta"):
        model = BUILDERS["unet"]().requires_grad_(False)
    converted = to_fp8(model)
    assert converted and all(b.device.type == "meta" for b in model.buffers())
    with torch.device("meta"):
        out = model(torch.randn(2, 4, 8, 8), torch.ones(2), torch.randn(2, 3, 8)).sample
    assert out.shape == (2, 4, 8, 8)


def test_fp8_with_a_quantised_base_or_full_fine_tuning_is_one_line(with_cuda):
    base = dict(pretrained_model_name_or_path="m", train_data_dir="d", fp8_base=True)
    with pytest.raises(UserError, match="--fp8_base and --quantize_base nf4 both set the base's storage"):
        from_values(LoraTrainConfig, dict(base, quantize_base="nf4"))
    with pytest.raises(UserError, match="--fp8_base is for a frozen base; full fine-tuning trains it"):
        from_values(FullTrainConfig, base)


def test_a_lora_trained_on_an_fp8_base_loads_onto_the_full_precision_base(tiny_sd1, shapes_dir, tmp_path):
    cfg = from_values(LoraTrainConfig, dict(
        pretrained_model_name_or_path=str(tiny_sd1), train_data_dir=str(shapes_dir), output_dir=str(tmp_path / "out"),
        resolution=32, train_batch_size=2, max_train_steps=3, learning_rate=1e-2, report_to="none", fp8_base=True,
        gradient_checkpointing=True, blocks_to_swap=1,
    ))  # fmt: skip
    result = train(cfg, LORA)
    assert len(result.losses) == 3 and all(loss == loss for loss in result.losses)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)

    def image():
        out = pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                   generator=torch.Generator().manual_seed(0))  # fmt: skip
        return out.images[0]

    before = image()
    pipe.load_lora_weights(str(tmp_path / "out"))
    assert abs(image() - before).max() > 1e-3


@pytest.mark.slow
def test_demo_accuracy_on_an_fp8_base_is_within_five_points_of_full_precision(tmp_path):
    """The embedded UNet demo, shortened, trained twice (fp8 base and full precision) and scored as the demo scores:
    the fp8-trained LoRA loaded onto the full-precision base."""
    from difftune.finetune import demo

    accuracy = {}
    for fp8 in (False, True):
        work = tmp_path / ("fp8" if fp8 else "fp32")
        values = demo.demo_values("unet", work)
        values.update(max_train_steps=900, fp8_base=fp8, validation_prompt=None, report_to="none")
        cfg = from_values(LoraTrainConfig, values)
        train(cfg, LORA)
        scores = demo.evaluate(values["pretrained_model_name_or_path"], Path(cfg.training.output_dir), seeds=4)
        accuracy[fp8] = scores
        print(f"fp8_base={fp8}: purple {scores['purple']}; base {scores['base']}")
    for prompts in ("purple", "base"):
        assert accuracy[True][prompts].colour == pytest.approx(accuracy[False][prompts].colour, abs=0.05)
    assert accuracy[False]["purple"].colour >= 0.5  # the shortened run still learns purple
