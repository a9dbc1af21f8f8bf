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

from difftune.core.config import check_value, field_types
from difftune.core.errors import UserError

FAMILIES: tuple[str, ...] = ("vae", "gan", "pixelcnn", "glow", "ddpm")


def build_model(family: str, resolution: int = 32, channels: int = 3, n_bits: int = 8, **overrides):
    """Builds a family's model; unknown families, options or incompatible sizes raise UserError."""
    if family not in FAMILIES:
        raise UserError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    if resolution < 1:
        raise UserError(f"--resolution {resolution} must be a positive number of pixels (e.g. 32)")
    module = importlib.import_module(f"difftune.baselines.{family}")
    return module.build(resolution=resolution, channels=channels, n_bits=n_bits, **overrides)


def strict_config(family: str, cls, overrides: dict, **fixed):
    """`cls(**fixed, **overrides)`, strictly: an unknown option or a value of the wrong type is a UserError naming
    it. The types are the Config's annotations, checked by `core.config.check_value` (lists become tuples where the
    field is a tuple, an int is accepted where it is a float, a bool is never an int)."""
    types = field_types(cls)
    names = [name for name in types if name not in fixed]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise UserError(f"{family}: unknown option {unknown[0]!r}; options: {', '.join(names)}")
    values = {k: check_value(v, types[k], f"{family}: option {k}") for k, v in overrides.items()}
    return cls(**fixed, **values)


def check_options(family: str, overrides: dict) -> None:
    """Checks a family's Config options (names and types) without building the model: for configs read early."""
    if family not in FAMILIES:
        raise UserError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    cls = importlib.import_module(f"difftune.baselines.{family}").Config
    sizes = {name: getattr(cls, name) for name in ("resolution", "channels", "n_bits") if hasattr(cls, name)}
    strict_config(family, cls, overrides, **sizes)
