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

import dataclasses
import importlib

from core.errors import UserError

FAMILIES: tuple[str, ...] = ("vae", "gan", "pixelcnn", "glow", "ddpm")


def build_model(family: str, resolution: int = 32, channels: int = 3, n_bits: int = 8, **overrides):
    """Builds a family's model; unknown families, options or incompatible sizes raise UserError."""
    if family not in FAMILIES:
        raise UserError(f"unknown family {family!r}; choose from {', '.join(FAMILIES)}")
    module = importlib.import_module(f"baselines.{family}")
    return module.build(resolution=resolution, channels=channels, n_bits=n_bits, **overrides)


def strict_config(family: str, cls, overrides: dict, **fixed):
    """`cls(**fixed, **overrides)`, strictly: an unknown option or a value of the wrong type is a UserError naming
    it. Lists become tuples; an int is accepted where the default is a float; a bool is never an int."""
    names = [f.name for f in dataclasses.fields(cls) if f.name not in fixed]
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise UserError(f"{family}: unknown option {unknown[0]!r}; options: {', '.join(names)}")
    config = cls(**fixed, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
    for name in names:
        value, default = getattr(config, name), getattr(cls, name)
        ok = isinstance(value, type(default)) and not (isinstance(value, bool) and not isinstance(default, bool))
        if ok and isinstance(default, tuple) and default:  # e.g. block_out_channels: elements of the default's type
            ok = all(type(item) is type(default[0]) for item in value)
        if type(default) is float and type(value) is int:
            setattr(config, name, float(value))
        elif not ok:
            raise UserError(f"{family}: option {name} must be {type(default).__name__}, got {value!r}")
    return config
