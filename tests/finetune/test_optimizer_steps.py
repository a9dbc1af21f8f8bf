"""Full fine-tuning's memory options: gradient release (`--fused_backward_pass`) gives the standard step's weights
and optimizer state, stochastic rounding (`--full_bf16`) keeps tiny updates that round-to-nearest loses, and
`--max_grad_norm 0` means no clipping; every misuse is one line."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from difftune.core.config import from_values
from difftune.core.errors import UserError
from difftune.finetune.config import FullTrainConfig, LoraTrainConfig
from difftune.finetune.loop import train
from difftune.finetune.optimizer_steps import release_gradients, round_stochastic_, stochastic_bf16_step
from difftune.finetune.tasks import FULL


def full(model, data, out, **settings) -> FullTrainConfig:
    values = dict(pretrained_model_name_or_path=str(model), train_data_dir=str(data), output_dir=str(out),
                  resolution=32, train_batch_size=2, max_train_steps=10, checkpointing_steps=10, learning_rate=1e-3,
                  report_to="none", seed=3, max_grad_norm=0.0)  # fmt: skip
    return from_values(FullTrainConfig, {**values, **settings})


def checkpoint(out, step=10):
    folder = out / f"checkpoint-{step}"
    return load_file(folder / "model.safetensors"), load_file(folder / "optimizer.safetensors")


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_fused_backward_pass_gives_the_standard_steps_weights_over_10_steps(tiny_sd1, shapes_dir, tmp_path, optimizer):
    standard = train(full(tiny_sd1, shapes_dir, tmp_path / "standard", optimizer=optimizer), FULL)
    fused = train(full(tiny_sd1, shapes_dir, tmp_path / "fused", optimizer=optimizer, fused_backward_pass=True), FULL)
    assert fused.losses == standard.losses
    (w_standard, o_standard), (w_fused, o_fused) = checkpoint(tmp_path / "standard"), checkpoint(tmp_path / "fused")
    assert w_standard.keys() == w_fused.keys() and o_standard.keys() == o_fused.keys()
    assert all(torch.equal(w_standard[k], w_fused[k]) for k in w_standard)
    assert all(torch.equal(o_standard[k], o_fused[k]) for k in o_standard)
    base = load_file(tiny_sd1 / "unet" / "diffusion_pytorch_model.safetensors")
    changed = [k for k in w_standard if not torch.equal(base[k.removeprefix("unet.")], w_standard[k])]
    assert len(changed) > len(w_standard) // 2  # --max_grad_norm 0 means no clipping, not gradients scaled to 0


def test_gradients_are_released_as_they_are_ready():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    reference = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    reference.load_state_dict(model.state_dict())
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    release_gradients(optimizer)
    ready = []
    for p in model.parameters():  # registered after the release hook: sees each gradient already freed
        p.register_post_accumulate_grad_hook(lambda p: ready.append(p.grad is None))
    expected = torch.optim.AdamW(reference.parameters(), lr=1e-2)
    x = torch.randn(5, 4)
    for _ in range(3):
        model(x).square().sum().backward()
        optimizer.step()  # finds no gradient: a no-op, as in the loop
        reference(x).square().sum().backward()
        expected.step()
        expected.zero_grad()
    assert ready and all(ready)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True))


def test_stochastic_rounding_keeps_the_expected_value_of_tiny_updates():
    """100 AdamW steps of about 1e-4 each on weights at 1.0, where a bf16 step is 2^-7 = 0.0078: to nearest every
    update is lost; stochastically the mean follows fp32 (20,000 weights: the mean's noise is about 1e-4)."""

    def run(dtype, stochastic):
        torch.manual_seed(0)
        w = torch.nn.Parameter(torch.ones(20_000, dtype=dtype))
        optimizer = torch.optim.AdamW([w], lr=1e-4, weight_decay=0.0)
        if stochastic:
            stochastic_bf16_step(optimizer)
        for _ in range(100):
            w.grad = -torch.ones_like(w)
            optimizer.step()
        return w.detach().double()

    fp32, nearest, stochastic = run(torch.float32, False), run(torch.bfloat16, False), run(torch.bfloat16, True)
    assert fp32.mean().item() == pytest.approx(1.01, abs=1e-4)
    assert nearest.mean().item() == 1.0  # round to nearest: every update lost
    assert stochastic.mean().item() == pytest.approx(fp32.mean().item(), abs=1e-3)


def test_stochastic_rounding_is_unbiased_for_negative_values_too():
    torch.manual_seed(0)
    source = torch.full((100_000,), -1.0 - 0.25 * 2**-7)  # a quarter of the way from -1 to the next bf16 value
    target = torch.empty_like(source, dtype=torch.bfloat16)
    round_stochastic_(target, source, seed=0)
    assert set(target.unique().tolist()) == {-1.0, -1.0078125}
    assert target.double().mean().item() == pytest.approx(source[0].item(), abs=5e-5)  # the mean's noise: 1e-5


@pytest.fixture
def bf16_process():
    """accelerate fixes a process's precision at its first Accelerator: reset around a bf16 run."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def test_full_bf16_trains_bf16_weights_with_fp32_state_and_resumes_exactly(tiny_sd1, shapes_dir, tmp_path,
                                                                            bf16_process):  # fmt: skip
    settings = dict(full_bf16=True, mixed_precision="bf16", max_train_steps=4, checkpointing_steps=2)
    straight = train(full(tiny_sd1, shapes_dir, tmp_path / "a", **settings), FULL)
    weights, state = checkpoint(tmp_path / "a", 4)
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert {t.dtype for k, t in state.items() if "exp_avg" in k} == {torch.float32}
    train(full(tiny_sd1, shapes_dir, tmp_path / "b", **{**settings, "max_train_steps": 2}), FULL)
    resumed = train(full(tiny_sd1, shapes_dir, tmp_path / "b", resume_from_checkpoint="latest", **settings), FULL)
    assert resumed.losses == straight.losses[2:]
    weights_b, state_b = checkpoint(tmp_path / "b", 4)
    assert all(torch.equal(weights[k], weights_b[k]) for k in weights)
    assert all(torch.equal(state[k], state_b[k]) for k in state)  # the fp32 moments came back fp32


def test_both_run_on_meta_tensors():
    with torch.device("meta"):
        model = torch.nn.Linear(4, 4).to(torch.bfloat16)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        stochastic_bf16_step(optimizer)
        release_gradients(optimizer, seed=0)
        model(torch.randn(2, 4, dtype=torch.bfloat16)).sum().backward()
    assert all(p.grad is None and p.dtype == torch.bfloat16 for p in model.parameters())
    assert {s["exp_avg"].dtype for s in optimizer.state.values()} == {torch.float32}


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(fused_backward_pass=True, max_grad_norm=1.0), r"pass --max_grad_norm 0 \(no clipping\)"),
        (dict(fused_backward_pass=True, gradient_accumulation_steps=2), "drop --gradient_accumulation_steps 2"),
        (dict(fused_backward_pass=True, optimizer="adamw8bit"), "use --optimizer adamw or adafactor, not adamw8bit"),
        (dict(fused_backward_pass=True, mixed_precision="fp16"), "cannot step on fp16's loss-scaled gradients"),
        (dict(full_bf16=True, mixed_precision="no"), "--full_bf16 needs --mixed_precision bf16, not no"),
        (dict(full_bf16=True, use_ema=True), "--use_ema with --full_bf16"),
        (dict(max_grad_norm=-1.0), "must not be negative"),
    ],
)
def test_misuse_is_one_line(settings, message, with_cuda):
    values = dict(pretrained_model_name_or_path="m", train_data_dir="d", max_grad_norm=0.0)
    with pytest.raises(UserError, match=message):
        from_values(FullTrainConfig, {**values, **settings})


@pytest.mark.parametrize("flag", ["fused_backward_pass", "full_bf16"])
def test_lora_refuses_the_full_fine_tuning_options(flag):
    with pytest.raises(UserError, match=f"--{flag} is for full fine-tuning"):
        from_values(LoraTrainConfig, {"pretrained_model_name_or_path": "m", "train_data_dir": "d", flag: True})


def test_accelerates_precision_is_checked_at_launch():
    cfg = from_values(FullTrainConfig, dict(pretrained_model_name_or_path="m", train_data_dir="d", full_bf16=True))
    with pytest.raises(UserError, match="--full_bf16 needs --mixed_precision bf16, not fp16"):
        cfg.memory.check_run(1, "fp16")
