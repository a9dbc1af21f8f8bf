"""The VAE: it learns, samples on the data grid, reloads exactly, and its bound is a true bound on discrete data."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from difftune.baselines import build_model
from difftune.baselines.data import load_tensor
from difftune.baselines.train import Budget, fit, load_model, save_model
from difftune.core.errors import UserError


def batch(resolution: int = 8, n: int = 16) -> torch.Tensor:
    x, _ = load_tensor(shapes=True, resolution=resolution, n_per_class=2, seed=0)
    return x[torch.randperm(len(x), generator=torch.Generator().manual_seed(0))[:n]]


def mean_loss(model, x: torch.Tensor, repeats: int = 4) -> float:
    torch.manual_seed(123)
    with torch.no_grad():
        return sum(float(model.loss(x)["loss"]) for _ in range(repeats)) / repeats


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    x = batch()
    model = build_model("vae", resolution=8, channels=3, n_bits=8, hidden=16)
    before = mean_loss(model, x)
    result = fit(model, x, batch_size=16, lr=2e-3, budget=Budget(steps=40), seed=0)
    assert not result.diverged and result.steps == 40 and result.images_seen == 640
    assert mean_loss(model, x) < 0.6 * before


def test_sample_shape_range_and_grid():
    torch.manual_seed(0)
    model = build_model("vae", resolution=8, channels=1, n_bits=3, hidden=8)
    x = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert x.shape == (5, 1, 8, 8)
    assert 0 <= x.min() and x.max() <= 1
    assert torch.equal(torch.round(x * 7) / 7, x)


def test_images_decode_to_the_mean_of_the_decoder_not_its_mode():
    """Dark-background data: the background level 0 holds 40% of a stroke pixel's mass, the grey levels 200-255 the
    rest. The mode is black; the mean is the grey the pixel means."""
    model = build_model("vae", resolution=8, channels=1, n_bits=8, hidden=8)
    logits = torch.full((2, 1, 8, 8, 256), -1e4)
    logits[..., 0] = math.log(0.4)
    logits[..., 200:] = math.log(0.6 / 56)
    model.logits = lambda z: logits
    x = model.decode(torch.zeros(2, model.config.latent_channels))
    assert torch.allclose(x, torch.full_like(x, 0.6 * 227.5 / 255), atol=1 / 255)
    assert torch.equal(torch.round(x * 255) / 255, x)  # on the data grid


def test_one_latent_vector_per_image_at_any_resolution():
    for resolution, downsample in ((8, 3), (32, 3), (12, 2)):
        model = build_model("vae", resolution=resolution, channels=1, n_bits=8, hidden=8, downsample=downsample)
        mean, logvar = model.encode(torch.rand(3, 1, resolution, resolution))
        assert mean.shape == logvar.shape == (3, model.config.latent_channels)
        assert model.sample(2, generator=torch.Generator().manual_seed(0)).shape == (2, 1, resolution, resolution)


def test_save_then_load_samples_the_same_images(tmp_path):
    torch.manual_seed(0)
    model = build_model("vae", resolution=8, channels=3, n_bits=8, hidden=16, beta=0.5).eval()
    # Untrained, the decoder's mean is grey 0.5 whatever the latent; wide weights make the latent matter.
    for layer in (model.decoder[0], model.decoder[-1]):
        torch.nn.init.normal_(layer.weight, std=3.0)
    save_model(tmp_path, model, "vae", 8, 3, 8)
    again = load_model(tmp_path)
    assert again.config == model.config
    first = model.sample(4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, again.sample(4, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(first, again.sample(4, generator=torch.Generator().manual_seed(8)))


def test_bound_is_honest_on_every_binary_4x4_image():
    """Sum over all 2**16 images of 2**(-D bits/dim) must be <= 1: the ELBO never exceeds log p(x).

    The model is trained on 8 patterns, so it is far from uniform and the bound has a real gap to show. The bound
    is a Monte Carlo estimate (8 draws of z per image, the default); its noise can only push the sum up.
    """
    torch.manual_seed(0)
    everything = torch.tensor(list(itertools.product([0.0, 1.0], repeat=16))).view(-1, 1, 4, 4)
    patterns = everything[torch.randperm(len(everything), generator=torch.Generator().manual_seed(0))[:8]]
    model = build_model("vae", resolution=4, channels=1, n_bits=1, hidden=8, latent_channels=4, downsample=1)
    fit(model, patterns.repeat(8, 1, 1, 1), batch_size=64, lr=3e-3, budget=Budget(steps=100), seed=0)
    assert model.bits_per_dim(patterns).mean() < 0.95  # learned: below the uniform model's 1 bit/dim
    bpd = torch.cat([model.bits_per_dim(chunk) for chunk in everything.split(16384)]).double()
    total = torch.exp2(-16 * bpd).sum().item()
    assert 0.05 < total <= 1.0  # above 0.05: the bound is not vacuously loose either
    # The importance-weighted bound is tighter than the ELBO, on average.
    assert model.bits_per_dim(patterns, k=64).mean() < model.bits_per_dim(patterns, samples=64).mean()


def test_interpolation_and_anomaly_score():
    torch.manual_seed(0)
    x = batch()
    model = build_model("vae", resolution=8, channels=3, n_bits=8, hidden=16)
    fit(model, x, batch_size=16, lr=2e-3, budget=Budget(steps=40), seed=0)
    path = model.interpolate(x[0], x[1], steps=5)
    assert path.shape == (5, 3, 8, 8)
    assert torch.equal(path[0], model.decode(model.encode(x[:1])[0])[0])
    assert model.anomaly_score(x).shape == (16,)
    assert model.anomaly_score(x).mean() < model.anomaly_score(1 - x).mean()  # inverted images are unusual


@pytest.mark.parametrize(
    ("overrides", "resolution", "message"),
    [({"hiden": 8}, 8, "hiden"), ({"beta": "big"}, 8, "beta must be a number"), ({}, 6, "resolution 6")],
)
def test_bad_options_are_user_errors(overrides, resolution, message):
    with pytest.raises(UserError, match=message):
        build_model("vae", resolution=resolution, channels=3, n_bits=8, **overrides)
