"""The StyleGAN: its samples move towards the data, sampling repeats for a seed and after reloading, and both
losses and the spectral-norm option train without diverging."""

from __future__ import annotations

import pytest
import torch

from difftune.baselines import build_model
from difftune.baselines.data import load_tensor
from difftune.baselines.train import Budget, fit, load_model, save_model
from difftune.core.errors import UserError

TINY = {"hidden": 16, "style_dim": 32, "n_mlp": 2}


def shapes_batch() -> torch.Tensor:
    x, _ = load_tensor(shapes=True, resolution=8, n_per_class=2, seed=0)
    return x[:16]


def mean_gap(model, x: torch.Tensor) -> float:
    """How far the average sample is from the average training image, per subpixel."""
    samples = model.sample(64, generator=torch.Generator().manual_seed(1))
    return (samples.mean(0) - x.mean(0)).abs().mean().item()


def test_samples_move_towards_the_data():
    # A GAN's losses need not fall (it is a game); what must change is what the generator draws.
    torch.manual_seed(0)
    x = shapes_batch()
    model = build_model("gan", resolution=8, channels=3, n_bits=8, **TINY)
    before = mean_gap(model, x)
    result = fit(model, x, batch_size=16, lr=2e-3, budget=Budget(steps=60), seed=0, log_every=20)
    assert not result.diverged and result.steps == 60
    assert [step for step, _ in result.losses] == [1, 20, 40, 60]
    assert mean_gap(model, x) < 0.5 * before


@pytest.mark.parametrize(("loss", "spectral_norm"), [("wgan-gp", False), ("logistic", True)])
def test_options_train_and_log_their_terms(loss, spectral_norm):
    torch.manual_seed(0)
    model = build_model("gan", resolution=8, channels=3, n_bits=8, loss=loss, spectral_norm=spectral_norm, **TINY)
    seen = []
    fit(model, shapes_batch(), batch_size=8, lr=1e-3, budget=Budget(steps=4), seed=0, log_every=1,
        on_log=lambda step, terms: seen.append(terms))  # fmt: skip
    assert all(torch.isfinite(torch.tensor(list(t.values()))).all() for t in seen)
    assert ("gp" in seen[0]) == (loss == "wgan-gp") and ("r1" in seen[0]) == (loss == "logistic")
    terms = model.loss(shapes_batch())
    assert set(terms) == {"loss", "g_loss", "d_loss"} and not terms["loss"].requires_grad


def test_identical_images_give_finite_gradients():
    # Regression: the minibatch standard deviation used .std(), whose gradient at variance 0 is NaN; a group of
    # identical images (plain white backgrounds) has variance exactly 0 and turned every weight into NaN.
    torch.manual_seed(0)
    model = build_model("gan", resolution=8, channels=3, n_bits=8, **TINY)
    x = torch.ones(8, 3, 8, 8, requires_grad=True)
    model.discriminator(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in model.discriminator.parameters())
    result = fit(model, torch.ones(16, 3, 8, 8), batch_size=8, lr=1e-3, budget=Budget(steps=20), seed=0, log_every=1)
    assert not result.diverged and result.steps == 20


def test_sampling_repeats_for_a_seed_and_after_reloading(tmp_path):
    torch.manual_seed(0)
    model = build_model("gan", resolution=8, channels=1, n_bits=5, spectral_norm=True, **TINY)
    fit(model, shapes_batch().mean(1, keepdim=True), batch_size=8, lr=1e-3, budget=Budget(steps=3), seed=0)
    draw = model.sample(4, generator=torch.Generator().manual_seed(0))
    assert draw.shape == (4, 1, 8, 8) and 0 <= draw.min() and draw.max() <= 1
    assert torch.equal(torch.round(draw * 31) / 31, draw)
    save_model(tmp_path, model, "gan", 8, 1, 5)
    again = load_model(tmp_path)
    assert torch.equal(draw, again.sample(4, generator=torch.Generator().manual_seed(0)))
    assert not torch.equal(draw, again.sample(4, generator=torch.Generator().manual_seed(1)))


def test_style_mixing_uses_two_styles():
    torch.manual_seed(0)
    model = build_model("gan", resolution=16, channels=3, n_bits=8, **TINY)
    ws = model.styles(2, "cpu", mix=True)  # (2, n_styles, style_dim)
    assert ws.shape == (2, model.generator.n_styles, 32)
    assert not torch.equal(ws[:, 0], ws[:, -1])  # the crossover is after layer 0, before the last
    plain = model.styles(2, "cpu")
    assert torch.equal(plain, plain[:, :1].expand_as(plain))


def test_no_likelihood_and_bad_options():
    model = build_model("gan", resolution=4, channels=3, n_bits=8, **TINY)
    assert model.likelihood == "none" and not hasattr(model, "bits_per_dim")
    with pytest.raises(UserError, match="power of two"):
        build_model("gan", resolution=12, channels=3, n_bits=8)
    with pytest.raises(UserError, match="hinge"):
        build_model("gan", resolution=8, channels=3, n_bits=8, loss="hinge")
