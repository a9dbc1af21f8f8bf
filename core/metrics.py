"""Sample-quality metrics: the one home of Fréchet distance, precision/recall, density/coverage and mode statistics.

Both the family comparison (`baselines.compare`) and the sampler benchmark call these. Every function takes
features (numpy arrays or torch tensors of shape (N, D)) or labels, and returns plain Python floats.

- Fréchet distance: Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash
  Equilibrium" (FID when the features are Inception's; here any feature extractor).
- Precision and recall (k-NN manifolds, k=3): Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
  Assessing Generative Models".
- Density and coverage (k=5): Naeem et al. 2020, "Reliable Fidelity and Diversity Metrics for Generative Models".
- Modes covered and KL of the generated label histogram from the real one: Metz et al. 2017 (Unrolled GANs) and
  Lin et al. 2018 (PacGAN), where a classifier trained on the data assigns each sample a mode.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import scipy.linalg
import torch

ArrayLike = np.ndarray | torch.Tensor


def _as_float64(feats: ArrayLike, name: str) -> np.ndarray:
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().cpu().numpy()
    arr = np.asarray(feats, dtype=np.float64)
    if arr.ndim != 2:
        raise ValueError(f"{name} must be (N, D) features, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains non-finite values")
    return arr


def frechet_distance(feats_a: ArrayLike, feats_b: ArrayLike) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (Heusel et al. 2017).

    FD = |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)). The trace of the matrix square root is computed
    in float64 through the symmetric form Tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), which has the same eigenvalues as
    S_a S_b but is symmetric positive semi-definite, so it has no spurious imaginary parts (the failure mode of
    `sqrtm(S_a @ S_b)` that pytorch-fid patches with an offset); both roots come from `scipy.linalg.eigh`.
    The estimate is biased upwards for finite samples: compare numbers computed with the same sample sizes.
    """
    a, b = _as_float64(feats_a, "feats_a"), _as_float64(feats_b, "feats_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    if min(len(a), len(b)) < 2:
        raise ValueError(f"need at least 2 samples per set for a covariance, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    sqrt_a = _psd_sqrt(cov_a)
    middle = sqrt_a @ cov_b @ sqrt_a
    tr_covmean = float(np.trace(_psd_sqrt((middle + middle.T) / 2)))
    fd = float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * tr_covmean)
    return max(fd, 0.0)  # round-off can leave a tiny negative number for identical sets


def _psd_sqrt(m: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix from its eigendecomposition (`scipy.linalg.eigh`).

    Eigenvalues that round-off pushed below zero are clipped; unlike `scipy.linalg.sqrtm`, this never warns about
    or mishandles the singular covariances that few samples in many dimensions give.
    """
    w, v = scipy.linalg.eigh(m)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def _distances(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Euclidean distances (len(x), len(y)), in float64."""
    return torch.cdist(torch.from_numpy(x), torch.from_numpy(y)).numpy()


def _kth_neighbour_radii(x: np.ndarray, k: int, name: str) -> np.ndarray:
    """Distance from each row of x to its k-th nearest other row (the point itself excluded)."""
    if len(x) <= k:
        raise ValueError(f"k={k} nearest neighbours need more than {k} {name} samples, got {len(x)}")
    d = _distances(x, x)
    return np.sort(d, axis=1)[:, k]  # column 0 is the point itself (distance 0)


def precision_recall(real: ArrayLike, fake: ArrayLike, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019) with k-NN balls (k=3 as in the paper).

    Precision: the share of fake samples inside the real manifold (the union of balls around each real sample
    reaching its k-th nearest real neighbour). Recall: the share of real samples inside the fake manifold.
    """
    r, f = _as_float64(real, "real"), _as_float64(fake, "fake")
    radii_r = _kth_neighbour_radii(r, k, "real")
    radii_f = _kth_neighbour_radii(f, k, "fake")
    d = _distances(r, f)  # (N_real, N_fake)
    precision = (d <= radii_r[:, None]).any(axis=0).mean()
    recall = (d <= radii_f[None, :]).any(axis=1).mean()
    return {"precision": float(precision), "recall": float(recall)}


def density_coverage(real: ArrayLike, fake: ArrayLike, k: int = 5) -> dict[str, float]:
    """Density and coverage (Naeem et al. 2020), k=5 as in the paper.

    Density: how many real k-NN balls each fake sample falls in, averaged and divided by k (about 1 when fake
    matches real; above 1 when fakes crowd dense real regions). Coverage: the share of real samples whose k-NN
    ball holds at least one fake sample (robust to outliers in the fake set, unlike recall).
    """
    r, f = _as_float64(real, "real"), _as_float64(fake, "fake")
    radii_r = _kth_neighbour_radii(r, k, "real")
    inside = _distances(r, f) < radii_r[:, None]  # (N_real, N_fake)
    density = inside.sum(axis=0).mean() / k
    coverage = inside.any(axis=1).mean()
    return {"density": float(density), "coverage": float(coverage)}


def mean_pairwise_distance(feats: ArrayLike) -> float:
    """Mean Euclidean distance between distinct pairs of rows: a simple diversity figure (0 for one repeated image)."""
    x = _as_float64(feats, "feats")
    if len(x) < 2:
        raise ValueError(f"need at least 2 samples for pairwise distances, got {len(x)}")
    d = _distances(x, x)
    n = len(x)
    return float(d.sum() / (n * (n - 1)))


def pairwise_distance_ratio(real: ArrayLike, fake: ArrayLike) -> float:
    """Mean pairwise distance of fake samples divided by that of real ones: ~1 when as diverse, ~0 when collapsed."""
    return mean_pairwise_distance(fake) / max(mean_pairwise_distance(real), 1e-12)


def label_histogram(labels: Sequence[int] | np.ndarray, n_modes: int) -> np.ndarray:
    """Counts of each mode 0..n_modes-1 (integer labels)."""
    arr = np.asarray(labels, dtype=np.int64)
    if arr.size and (arr.min() < 0 or arr.max() >= n_modes):
        raise ValueError(f"labels must lie in [0, {n_modes}), got range [{arr.min()}, {arr.max()}]")
    return np.bincount(arr, minlength=n_modes).astype(np.float64)


def mode_stats(
    pred_labels: Sequence[int] | np.ndarray,
    real_labels: Sequence[int] | np.ndarray,
    n_modes: int,
    min_count: int = 1,
    pseudo_count: float = 0.5,
) -> dict[str, float]:
    """Mode coverage and the KL divergence of the generated label histogram from the real one.

    `pred_labels`: the evaluation classifier's label for each generated sample; `real_labels`: the labels of real
    images; both integers in [0, n_modes). A mode is covered when at least `min_count` samples land in it (as
    counted for stacked MNIST by Metz et al. 2017 and Lin et al. 2018). KL(generated || real) is computed on both
    histograms smoothed with `pseudo_count` added to every mode (0.5: the Krichevsky-Trofimov estimator), so an
    empty mode gives a finite number; for one collapsed mode the KL tends to log(n_modes) under a uniform real
    histogram.
    """
    if n_modes < 1:
        raise ValueError(f"n_modes must be at least 1, got {n_modes}")
    gen = label_histogram(pred_labels, n_modes)
    real = label_histogram(real_labels, n_modes)
    if gen.sum() == 0 or real.sum() == 0:
        raise ValueError(f"need labels on both sides, got {int(gen.sum())} generated and {int(real.sum())} real")
    p = (gen + pseudo_count) / (gen.sum() + pseudo_count * n_modes)
    q = (real + pseudo_count) / (real.sum() + pseudo_count * n_modes)
    return {
        "modes_covered": float((gen >= min_count).sum() / n_modes),
        "modes_covered_count": float((gen >= min_count).sum()),
        "kl_generated_real": float((p * np.log(p / q)).sum()),
    }
