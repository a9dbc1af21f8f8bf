"""Gated PixelCNN: causal masks without a blind spot, an exact likelihood, training, sampling, save/load, errors."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch
from safetensors.torch import load_model, save_model

from difftune.baselines.pixelcnn import build
from difftune.core.errors import UserError

TINY = {"hidden": 6, "layers": 2, "kernel": 3, "n_mix": 2}


def _all_binary_images() -> torch.Tensor:
    """Every 4x4 one-channel 1-bit image: (65536, 1, 4, 4)."""
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=16))).view(-1, 1, 4, 4)


def _train(model, x: torch.Tensor, steps: int, y: torch.Tensor | None = None) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model.loss(x, y)["loss"] if y is not None else model.loss(x)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("output", ["softmax", "logistic"])
@pytest.mark.parametrize("channels", [1, 3])
def test_each_subpixel_depends_on_exactly_the_subpixels_before_it(output, channels):
    torch.manual_seed(0)
    # 4 layers of 3x3 cover a 4x4 image, so "no blind spot" means every earlier subpixel matters
    model = build(4, channels, 2, hidden=9, layers=4, kernel=3, output=output, n_mix=2).double()
    x = torch.randint(0, 4, (1, channels, 4, 4)).double() / 3
    jac = torch.autograd.functional.jacobian(lambda z: model.params(z)[0], x)  # (C, H, W, P, 1, C, H, W)
    depends = jac[:, :, :, :, 0].abs().sum(3) > 0  # (C, H, W, C, H, W)
    order = torch.arange(16 * channels).view(4, 4, channels).permute(2, 0, 1)  # raster order, R before G before B
    earlier = order[None, None, None] < order[:, :, :, None, None, None]  # input earlier than output
    assert not (depends & ~earlier).any(), "an output sees its own or a later subpixel"
    assert (depends == earlier).all(), "an earlier subpixel is outside the receptive field (blind spot)"


@pytest.mark.parametrize("output", ["softmax", "logistic"])
def test_probabilities_of_all_images_sum_to_one_before_and_after_training(output):
    torch.manual_seed(0)
    model = build(4, 1, 1, output=output, **TINY)
    images = _all_binary_images()
    for trained in (False, True):
        if trained:
            _train(model, images[torch.randint(0, len(images), (32,))], steps=20)
        with torch.no_grad():
            bpd = model.bits_per_dim(images).double()
        total = torch.exp2(-16 * bpd).sum().item()
        assert abs(total - 1) < 1e-3, (trained, total)


def test_three_bit_rgb_probabilities_of_one_subpixel_sum_to_one():
    # the last subpixel's conditional, summed over its 8 values, must be 1 for both output types
    torch.manual_seed(0)
    for output in ("softmax", "logistic"):
        model = build(4, 3, 3, output=output, **TINY).double()
        x = (torch.randint(0, 8, (1, 3, 4, 4)).double() / 7).repeat(8, 1, 1, 1)
        x[:, 2, 3, 3] = torch.arange(8).double() / 7
        total = model.log_prob(x)[:, 2, 3, 3].exp().sum().item()
        assert abs(total - 1) < 1e-9, (output, total)


@pytest.mark.parametrize("output", ["softmax", "logistic"])
def test_loss_falls_on_a_fixed_batch(output):
    torch.manual_seed(0)
    model = build(4, 1, 2, output=output, **TINY)
    x = (torch.randint(0, 4, (4, 1, 4, 4)).float() / 3).repeat(4, 1, 1, 1)  # four images, so there is structure
    losses = _train(model, x, steps=40)
    assert losses[-1] < 0.7 * losses[0], losses


def test_class_conditional_model_trains_and_samples():
    torch.manual_seed(0)
    model = build(4, 1, 1, num_classes=2, **TINY)
    y = torch.tensor([0, 1] * 8)
    x = y.float().view(-1, 1, 1, 1).expand(-1, 1, 4, 4).contiguous()  # class 0 black, class 1 white
    losses = _train(model, x, steps=40, y=y)
    assert losses[-1] < 0.5 * losses[0], losses
    samples = model.sample(8, torch.Generator().manual_seed(0), y=torch.tensor([0] * 4 + [1] * 4))
    assert samples[:4].mean() < 0.3 and samples[4:].mean() > 0.7
    with pytest.raises(UserError, match="class-conditional"):
        model.loss(x)


@pytest.mark.parametrize("output", ["softmax", "logistic"])
def test_samples_lie_on_the_grid_and_repeat_after_save_and_load(output, tmp_path):
    torch.manual_seed(0)
    model = build(4, 3, 2, output=output, **TINY)
    samples = model.sample(5, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (5, 3, 4, 4)
    assert samples.min() >= 0 and samples.max() <= 1
    assert torch.equal(torch.round(samples * 3) / 3, samples)
    assert model.evals_per_sample(5) == 4 * 4 * 3

    save_model(model, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(model.config)))
    torch.manual_seed(123)  # a different init, overwritten by the load
    rebuilt = build(**json.loads((tmp_path / "config.json").read_text()))
    load_model(rebuilt, str(tmp_path / "model.safetensors"))
    assert torch.equal(rebuilt.sample(5, generator=torch.Generator().manual_seed(1)), samples)
    assert not torch.equal(rebuilt.sample(5, generator=torch.Generator().manual_seed(2)), samples)


def test_sampling_on_a_band_of_rows_gives_the_full_passes_distributions():
    """Sampling runs each pass on the `reach` rows above the pixel only: the distributions must be the full pass's."""
    torch.manual_seed(0)
    model = build(8, 3, 8, hidden=6, layers=2, kernel=3, num_classes=2)  # reach 3 < 8 rows
    x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    with torch.no_grad():
        full = model.params(x, y)
        for i in range(8):
            band = model._params(x[:, :, max(0, i - model.reach) : i + 1], y)[:, :, -1]
            assert torch.allclose(band, full[:, :, i], atol=1e-5), i
        shorter = model._params(x[:, :, 5 - model.reach + 1 : 6], y)[:, :, -1]  # one row too few: not the same
    assert not torch.allclose(shorter, full[:, :, 5], atol=1e-5)


def test_bad_options_raise_user_error():
    with pytest.raises(UserError, match="hiden"):
        build(4, 1, 1, hiden=8)
    with pytest.raises(UserError, match="output"):
        build(4, 1, 1, output="gaussian")
    with pytest.raises(UserError, match="kernel"):
        build(4, 1, 1, kernel=4)
    with pytest.raises(UserError, match="layers"):
        build(4, 1, 1, layers="two")
    with pytest.raises(UserError, match=r"\(B, 1, 4, 4\)"):
        build(4, 1, 1, **TINY).loss(torch.zeros(2, 1, 8, 8))
