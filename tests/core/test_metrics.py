"""The sample-quality metrics near their ideal on real-vs-real, showing collapse on one repeated image, and low
quality on noise; the Fréchet distance against an independent computation and a closed form."""

import numpy as np
import pytest
import scipy.linalg
import torch

from difftune.core import metrics

N_MODES, DIM, SPREAD_DIMS = 12, 8, 3


def clustered(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Features of a 12-mode 'dataset': well-separated clusters spread in 3 of 8 dims (features lie near a
    low-dimensional manifold, as a classifier's do), and the mode of each point. k-NN precision/recall fall below 1
    for real-vs-real as the intrinsic dimension grows (0.86 at 8 dims with k=3): a property of the metric."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(scale=6.0, size=(N_MODES, DIM))
    labels = rng.integers(0, N_MODES, n)
    spread = np.zeros((n, DIM))
    spread[:, :SPREAD_DIMS] = rng.normal(size=(n, SPREAD_DIMS))
    return centres[labels] + spread, labels


def test_real_vs_real_is_near_ideal():
    real, real_labels = clustered(800, seed=0)
    other, other_labels = clustered(800, seed=1)
    noise = np.random.default_rng(2).uniform(-15, 15, size=(800, DIM))
    fd = metrics.frechet_distance(real, other)
    assert fd < 0.02 * metrics.frechet_distance(real, noise)
    pr = metrics.precision_recall(real, other, k=3)
    dc = metrics.density_coverage(real, other, k=5)
    assert pr["precision"] > 0.9 and pr["recall"] > 0.9
    assert dc["coverage"] > 0.9 and 0.8 < dc["density"] < 1.2
    assert 0.95 < metrics.pairwise_distance_ratio(real, other) < 1.05
    modes = metrics.mode_stats(other_labels, real_labels, N_MODES)
    assert modes["modes_covered"] == 1.0 and modes["kl_generated_real"] < 0.05


def test_collapsed_generator_shows_collapse():
    real, real_labels = clustered(800, seed=0)
    one = np.repeat(real[:1], 800, axis=0)  # a generator that always draws the same image
    pr = metrics.precision_recall(real, one, k=3)
    dc = metrics.density_coverage(real, one, k=5)
    assert pr["precision"] == 1.0  # the one image is realistic ...
    assert pr["recall"] < 0.01 and dc["coverage"] < 0.05  # ... but covers almost nothing
    assert metrics.pairwise_distance_ratio(real, one) < 1e-6
    modes = metrics.mode_stats(np.full(800, real_labels[0]), real_labels, N_MODES)
    assert modes["modes_covered"] == pytest.approx(1 / N_MODES)
    assert modes["kl_generated_real"] > 2.0  # log(12) = 2.48 for a uniform real histogram


def test_noise_has_low_quality():
    real, _ = clustered(800, seed=0)
    noise = np.random.default_rng(3).uniform(-15, 15, size=(800, DIM))
    other, _ = clustered(800, seed=1)
    assert metrics.frechet_distance(real, noise) > 50 * metrics.frechet_distance(real, other)
    assert metrics.precision_recall(real, noise, k=3)["precision"] < 0.3
    assert metrics.density_coverage(real, noise, k=5)["density"] < 0.3


def test_frechet_distance_matches_closed_form_and_scipy_sqrtm():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(20000, 4))
    shift = np.array([1.0, -2.0, 0.0, 0.5])
    assert metrics.frechet_distance(a, rng.normal(size=(20000, 4)) + shift) == pytest.approx(5.25, rel=0.02)
    # the textbook formula with sqrtm(S_a S_b) on well-conditioned data, as an independent computation
    x, y = rng.normal(size=(500, 6)), rng.normal(size=(500, 6)) * 1.5 + 0.3
    ca, cb = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    ref = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(ca + cb - 2 * np.real(scipy.linalg.sqrtm(ca @ cb)))
    assert metrics.frechet_distance(torch.from_numpy(x), y) == pytest.approx(ref, rel=1e-6)
    assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_singular_covariance_stays_finite_and_zero_for_identical_sets():
    x = np.random.default_rng(0).normal(size=(10, 64))  # 10 samples in 64 dims: rank-9 covariance
    assert metrics.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert np.isfinite(metrics.frechet_distance(x, x + 1.0))


def test_bad_input_names_the_numbers():
    x = np.zeros((3, 2))
    with pytest.raises(ValueError, match="k=3 .* more than 3 real samples, got 3"):
        metrics.precision_recall(x, np.ones((10, 2)), k=3)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        metrics.mode_stats([0, 5], [0, 1], n_modes=4)
    with pytest.raises(ValueError, match="feature sizes differ"):
        metrics.frechet_distance(np.zeros((5, 2)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="non-finite"):
        metrics.frechet_distance(np.full((5, 2), np.nan), np.zeros((5, 2)))
