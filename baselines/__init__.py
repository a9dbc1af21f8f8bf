"""The other generative families, set beside Stable Diffusion on the same data.

Every family lives in one module (`baselines/<family>.py`) exposing `Config` (a dataclass) and
`build(resolution, channels, n_bits, **overrides) -> nn.Module`. The module returned offers:

- `config`: its `Config`, JSON-serialisable with `dataclasses.asdict`;
- `loss(x) -> dict`: a scalar ``"loss"`` to minimise plus any terms worth logging; `x` is (B, C, H, W) in [0, 1]
  on the grid k / (2**n_bits - 1);
- `sample(n, generator=None) -> Tensor`: (n, C, H, W) in [0, 1];
- `bits_per_dim(x) -> Tensor` (B,): for the likelihood families (vae, pixelcnn, glow, ddpm) only;
- `likelihood`: ``"exact"``, ``"bound"`` or ``"none"``; `evals_per_sample(n)`: network evaluations per image.
"""

from __future__ import annotations

import importlib

from pipelines.errors import UserError

FAMILIES: tuple[str, ...] = ("vae", "gan", "pixelcnn", "glow", "ddpm")


def build_model(family: str, resolution: int = 32, channels: int = 3, n_bits: int = 8, **overrides):
    """Builds a family's model; unknown families, options or incompatible sizes raise UserError."""
    if family not in FAMILIES:
        raise UserError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    module = importlib.import_module(f"baselines.{family}")
    return module.build(resolution=resolution, channels=channels, n_bits=n_bits, **overrides)
