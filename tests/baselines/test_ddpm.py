"""The pixel DDPM: it learns, every diffusers sampler draws on the data grid, reloads exactly, and its variational
bound is a true bound on discrete data."""

from __future__ import annotations

import itertools

import pytest
import torch

from difftune.baselines import build_model
from difftune.baselines.data import load_tensor
from difftune.baselines.ddpm import log_discretised_gaussian
from difftune.baselines.train import Budget, fit, load_model, save_model
from difftune.core.errors import UserError
from difftune.pipelines.samplers import sampler_names

TINY = {"block_out_channels": (16, 32), "num_train_timesteps": 10, "beta_schedule": "squaredcos_cap_v2"}


def mean_loss(model, x: torch.Tensor, repeats: int = 8) -> float:
    torch.manual_seed(123)
    with torch.no_grad():
        return sum(float(model.loss(x)["loss"]) for _ in range(repeats)) / repeats


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    x, _ = load_tensor(shapes=True, resolution=8, n_per_class=2, seed=0)
    x = x[:16]
    model = build_model("ddpm", resolution=8, channels=3, n_bits=8, ema=False, **TINY)
    before = mean_loss(model, x)
    result = fit(model, x, batch_size=16, lr=2e-3, budget=Budget(steps=40), seed=0)
    assert not result.diverged
    assert mean_loss(model, x) < 0.5 * before


@pytest.mark.parametrize("scheduler", sampler_names("ddpm"))
def test_every_sampler_repeats_for_a_seed_and_stays_on_the_grid(scheduler):
    """Every name of the one sampler registry (pipelines.samplers) draws here; evals_per_sample counts UNet passes."""
    torch.manual_seed(0)
    model = build_model("ddpm", resolution=8, channels=1, n_bits=4, **{**TINY, "num_train_timesteps": 100}).eval()
    calls = []
    model.unet.register_forward_hook(lambda *_: calls.append(1))
    draw = model.sample(3, generator=torch.Generator().manual_seed(0), scheduler=scheduler, steps=5)
    assert draw.shape == (3, 1, 8, 8)
    assert 0 <= draw.min() and draw.max() <= 1 and torch.equal(torch.round(draw * 15) / 15, draw)
    assert model.evals_per_sample(1, scheduler, 5) == len(calls) >= 5  # Heun and PNDM take more than one per step
    again = model.sample(3, generator=torch.Generator().manual_seed(0), scheduler=scheduler, steps=5)
    assert torch.equal(draw, again)


def test_save_then_load_samples_the_same_images(tmp_path):
    torch.manual_seed(0)
    model = build_model("ddpm", resolution=8, channels=3, n_bits=8, **TINY).eval()
    save_model(tmp_path, model, "ddpm", 8, 3, 8)
    again = load_model(tmp_path)
    assert again.config == model.config and again.scheduler.config == model.scheduler.config
    first = model.sample(2, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again.sample(2, generator=torch.Generator().manual_seed(3)))


def test_bound_is_honest_on_every_binary_4x4_image():
    """Sum over all 2**16 images of 2**(-D bits/dim) <= 1, the bound's sum over t taken exactly (4 timesteps).

    At 4 timesteps the bound is loose (about 4 bits/dim here, where a uniform model has 1), so the sum is far
    below 1; the check still catches a decoder or KL term off by a sign or a normaliser, which push it far above.
    """
    torch.manual_seed(0)
    everything = torch.tensor(list(itertools.product([0.0, 1.0], repeat=16))).view(-1, 1, 4, 4)
    patterns = everything[torch.randperm(len(everything), generator=torch.Generator().manual_seed(0))[:8]]
    model = build_model(
        "ddpm", resolution=4, channels=1, n_bits=1, block_out_channels=(8,), num_train_timesteps=4,
        beta_start=0.1, beta_end=0.6, ema=False,
    )  # fmt: skip
    fit(model, patterns.repeat(4, 1, 1, 1), batch_size=32, lr=3e-3, budget=Budget(steps=30), seed=0)
    bpd = torch.cat([model.bits_per_dim(chunk) for chunk in everything.split(16384)]).double()
    assert torch.isfinite(bpd).all() and (bpd > 0).all() and bpd.mean() < 8
    assert torch.exp2(-16 * bpd).sum().item() <= 1.0
    assert bpd[:8].mean() < bpd.mean()  # any structure at all: the bound ranks images


@pytest.mark.parametrize("levels", [2, 32, 256])
def test_discretised_decoder_sums_to_one_over_the_levels(levels):
    grid = torch.linspace(-1, 1, levels, dtype=torch.float64)[:, None]  # (levels, 1): every value, each mean
    means = torch.tensor([-1.7, -0.3, 0.0, 0.9999, 2.5], dtype=torch.float64)[None]  # (1, 5)
    for std in (1e-3, 0.05, 1.0):
        total = log_discretised_gaussian(grid, means, std, levels).exp().sum(0)
        assert torch.allclose(total, torch.ones_like(total), atol=1e-9)


def test_bad_input_is_a_user_error():
    with pytest.raises(UserError, match="resolution 7"):
        build_model("ddpm", resolution=7, channels=3, n_bits=8, **TINY)
    with pytest.raises(UserError, match="unknown sampler 'dpmpp'; choose one of: ddim, ddpm"):  # the old name
        build_model("ddpm", resolution=8, channels=3, n_bits=8, **TINY).sample(1, scheduler="dpmpp")
