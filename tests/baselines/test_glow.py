"""Glow: exact inverse and log-determinant, an honest likelihood, training, temperature sampling, save/load, errors."""

from __future__ import annotations

import dataclasses
import itertools
import json

import pytest
import torch
from safetensors.torch import load_model, save_model

from difftune.baselines.data import load_tensor
from difftune.baselines.glow import build
from difftune.core.errors import UserError

TINY = {"hidden": 8, "depth": 2, "n_levels": 2}


def _all_binary_images() -> torch.Tensor:
    """Every 4x4 one-channel 1-bit image: (65536, 1, 4, 4)."""
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=16))).view(-1, 1, 4, 4)


def _train(model, x: torch.Tensor, steps: int) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(steps):
        loss = model.loss(x)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _perturbed_double_model():
    """A tiny float64 Glow with actnorm initialised and every zero-initialised layer made non-trivial."""
    torch.manual_seed(0)
    model = build(4, 1, 1, **TINY).double()
    model.encode(torch.rand(8, 1, 4, 4, dtype=torch.float64))  # data-dependent actnorm init
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def test_decode_inverts_encode():
    model = _perturbed_double_model().float()
    x = torch.rand(6, 1, 4, 4)
    zs, _ = model.encode(x)
    assert [tuple(z.shape) for z in zs] == [(6, 2, 2, 2), (6, 8, 1, 1)]
    assert (model.decode(zs) - x).abs().max() < 1e-4


def test_log_determinant_matches_the_autograd_jacobian():
    model = _perturbed_double_model()
    x = torch.rand(1, 1, 4, 4, dtype=torch.float64)

    def flat_latents(v: torch.Tensor) -> torch.Tensor:
        return torch.cat([z.flatten() for z in model.encode(v.view(1, 1, 4, 4))[0]])

    jac = torch.autograd.functional.jacobian(flat_latents, x.flatten())  # (16, 16)
    _, logdet = model.encode(x)
    assert torch.allclose(torch.linalg.slogdet(jac).logabsdet, logdet[0], atol=1e-8)
    assert logdet.abs() > 1  # the perturbation made the flow far from volume-preserving


@pytest.mark.parametrize("trained", [False, True])
def test_discrete_probabilities_sum_to_at_most_one(trained):
    """Honest likelihood, checked against an independent estimate of the same mass.

    For a discrete image x, P(x) = mass of the flow density p on x's cell, and sum_x P(x) = M, the mass of p inside
    [0, 1)^D, which is <= 1. One draw of bits_per_dim gives 2**(-D * bpd) = p(x~) / K**D, an unbiased estimate of P(x)
    (not a bound either way); summed over all 2**16 images it is a stratified Monte Carlo estimate of M, whose standard
    error we measure from two draws per image. Averaging bits/dim over draws (log space) can only lower each term
    (Jensen), so that sum is checked too. M is also estimated independently as the fraction of flow samples that land
    in the cube; the two estimates must agree, which a wrong log-determinant, prior or log2 K term would break.
    """
    torch.manual_seed(0)
    model = build(4, 1, 1, **TINY)
    images = _all_binary_images()
    model.loss(images[torch.randint(0, len(images), (256,))])  # actnorm init on data
    if trained:
        _train(model, images[torch.randint(0, len(images), (64,))], steps=30)
    with torch.no_grad():
        bpd = torch.stack([model.bits_per_dim(images, torch.Generator().manual_seed(s)).double() for s in (1, 2)])
        inside = model.sample_dequantised(20000, torch.Generator().manual_seed(3))
    prob = torch.exp2(-16 * bpd)  # (2, 65536) unbiased estimates of each P(x)
    stratified = prob.mean(0).sum().item()
    stratified_se = (prob.var(0).sum() / 2).sqrt().item()
    in_cube = ((inside >= 0) & (inside < 1)).flatten(1).all(1).double()
    sampled, sampled_se = in_cube.mean().item(), (in_cube.var() / len(in_cube)).sqrt().item()

    assert stratified_se < 0.02 and sampled_se < 0.01  # the checks below have teeth
    assert stratified <= 1 + 5 * stratified_se, stratified
    assert prob[0].sum().item() <= 1 + 5 * 2**0.5 * stratified_se  # bits_per_dim exactly as reported, one draw
    assert torch.exp2(-16 * bpd.mean(0)).sum().item() <= 1 + 5 * stratified_se
    assert abs(stratified - sampled) <= 5 * (stratified_se**2 + sampled_se**2) ** 0.5, (stratified, sampled)


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    model = build(4, 1, 2, **TINY)
    x = (torch.randint(0, 4, (4, 1, 4, 4)).float() / 3).repeat(4, 1, 1, 1)
    losses = _train(model, x, steps=40)
    assert losses[-1] < 0.7 * losses[0], losses


def test_samples_lie_on_the_grid_and_temperature_zero_is_deterministic():
    torch.manual_seed(0)
    model = build(4, 3, 2, **TINY)
    _train(model, torch.randint(0, 4, (16, 3, 4, 4)).float() / 3, steps=5)
    samples = model.sample(8, generator=torch.Generator().manual_seed(0), temperature=0.7)
    assert samples.shape == (8, 3, 4, 4)
    assert samples.min() >= 0 and samples.max() <= 1
    assert torch.equal(torch.round(samples * 3) / 3, samples)
    assert model.evals_per_sample(8) == 1
    cold = model.sample_dequantised(3, torch.Generator().manual_seed(1), temperature=0.0)
    assert torch.allclose(cold, model.sample_dequantised(3, torch.Generator().manual_seed(2), temperature=0.0))
    warm = model.sample_dequantised(3, torch.Generator().manual_seed(1), temperature=1.0)
    assert not torch.allclose(warm, cold)


@pytest.mark.parametrize("seed", [0, 3])
def test_briefly_trained_model_samples_finite_values_at_temperature_one(seed):
    # Regression: a coupling's inverse divided by sigmoid(raw + 2) ~ exp(raw) and a split prior's std was exp(log_std),
    # both raw outputs linear in their input, so latents a little off the typical set blew up level after level: with
    # unbounded scales these two seeds drew 7 and 144 non-finite images out of 1024.
    x, _ = load_tensor(shapes=True, resolution=8, n_per_class=2, seed=0)  # (24, 3, 8, 8)
    torch.manual_seed(seed)
    model = build(8, 3, 8, hidden=16, depth=4, n_levels=2)
    _train(model, x, steps=100)
    samples = model.sample_dequantised(1024, torch.Generator().manual_seed(0), temperature=1.0)
    assert torch.isfinite(samples).all(), (~torch.isfinite(samples)).flatten(1).any(1).sum().item()


def test_latents_far_outside_the_prior_decode_to_finite_images():
    """The inverse grows at most linearly in its input, so any finite latent decodes to a finite image."""
    model = _perturbed_double_model().float()
    zs, _ = model.encode(torch.rand(64, 1, 4, 4))
    far = model.decode([100 * torch.randn_like(z) for z in zs])
    assert torch.isfinite(far).all()


def test_save_and_load_reproduce_samples_and_likelihoods(tmp_path):
    torch.manual_seed(0)
    model = build(4, 1, 2, **TINY)
    x = torch.randint(0, 4, (16, 1, 4, 4)).float() / 3
    _train(model, x, steps=5)
    save_model(model, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(dataclasses.asdict(model.config)))

    torch.manual_seed(123)  # a different init, overwritten by the load
    rebuilt = build(**json.loads((tmp_path / "config.json").read_text()))
    load_model(rebuilt, str(tmp_path / "model.safetensors"))
    for seed in (1, 2):
        expected = model.sample(4, generator=torch.Generator().manual_seed(seed))
        assert torch.equal(rebuilt.sample(4, generator=torch.Generator().manual_seed(seed)), expected)
    x_tilde = model.dequantise(x)
    with torch.no_grad():  # the loaded actnorm must not re-initialise on this batch
        assert torch.allclose(rebuilt.log_prob(x_tilde), model.log_prob(x_tilde), atol=1e-5)


def test_bad_options_raise_user_error():
    with pytest.raises(UserError, match="resolution 6 .* 2\\*\\*n_levels = 4"):
        build(6, 1, 1, **TINY)
    with pytest.raises(UserError, match="resolution 32"):
        build(32, 3, 8, n_levels=6)
    with pytest.raises(UserError, match="widht"):
        build(4, 1, 1, widht=8)
    with pytest.raises(UserError, match="depth"):
        build(4, 1, 1, depth=0)
    with pytest.raises(UserError, match=r"\(B, 1, 4, 4\)"):
        build(4, 1, 1, **TINY).loss(torch.zeros(2, 3, 4, 4))
