"""Glow: a normalising flow with an exact density, one network pass per sample.

Follows Kingma & Dhariwal 2018, "Glow: Generative Flow with Invertible 1x1 Convolutions": each level squeezes
(2x2 space to channels), runs `depth` steps of actnorm (data-dependent init) -> invertible 1x1 convolution in LU form
-> affine coupling (sigmoid scale), then splits off half the channels, whose learned Gaussian prior is conditioned on
the half that goes on (the multi-scale architecture of Dinh et al. 2017, "Density estimation using Real NVP"). The
top level has a learned Gaussian prior. Sampling at `temperature` T scales every prior standard deviation by T.

Bounded inverse. Two places turn a network output into an exponential: the coupling's inverse divides by its scale
sigmoid(raw + 2) ~ exp(raw) as raw -> -inf, and a split prior's std is exp(log_std). Both raw outputs grow linearly
with their input, so a latent drawn at temperature 1 a little off the data's typical set was amplified
exponentially, level after level, and a few samples in a hundred overflowed to inf/NaN after 20 s of training
(while the loss stayed finite). Hence the coupling scale is lifted onto [SCALE_FLOOR, 1) and the split priors'
log_std is softly bounded above by MAX_LOG_STD: the inverse then grows at most linearly in its input, and every
finite latent decodes to a finite image. Both are reparametrisations, so the flow stays exactly invertible with an
exact log-determinant. They do limit single layers (trained 3000 steps on the quick comparison's 8 px shapes, the
smallest scale on training images was 0.06 and the largest split log_std 4.9), but actnorm and the 1x1 convolutions
rescale freely, and the training loss after 1000 steps was the unbounded model's (4.96 vs 4.94 bits/dim on one batch,
one seed).

Likelihood. The model is a density over continuous images, so the discrete x (on the grid k / (K - 1), K = 2**n_bits)
is dequantised uniformly: x~ = (x * (K - 1) + u) / K with u ~ U[0, 1)^D, which lands in bin k's cell [k, k + 1) / K.
`bits_per_dim(x)` = -log p(x~) / (D ln 2) + log2 K for one draw of u: the exact density of the dequantised data, and,
in expectation over u (Jensen), an upper bound on the discrete -log2 P(x) / D, where P(x) is p's mass on x's cell.
This is the convention of the published 8-bit figures (Glow CIFAR-10: 3.35), so compare at n_bits=8 only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from difftune.baselines import strict_config
from difftune.core.errors import UserError


@dataclass
class Config:
    resolution: int = 32
    channels: int = 3
    n_bits: int = 8
    hidden: int = 512  # width of each coupling network
    depth: int = 32  # flow steps per level
    n_levels: int = 3  # squeezes; the resolution must be divisible by 2**n_levels


SCALE_FLOOR = 0.05  # smallest coupling scale: its inverse multiplies by at most 20
MAX_LOG_STD = 5.0  # soft upper bound on a split prior's log std (std <= e**5 ~ 148)


def _squeeze(x: Tensor) -> Tensor:
    return rearrange(x, "b c (h p) (w q) -> b (c p q) h w", p=2, q=2)  # (B, 4C, H/2, W/2)


def _unsqueeze(x: Tensor) -> Tensor:
    return rearrange(x, "b (c p q) h w -> b c (h p) (w q)", p=2, q=2)


def _gaussian_log_prob(z: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """Sum over (C, H, W) of log N(z; mean, exp(log_std)**2), (B,)."""
    return (-0.5 * (math.log(2 * math.pi) + 2 * log_std + (z - mean) ** 2 * torch.exp(-2 * log_std))).sum((1, 2, 3))


def _zero_conv(cin: int, cout: int) -> nn.Conv2d:
    """3x3 convolution initialised to output zero, so each coupling and prior starts as the identity / N(0, 1)."""
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


class _ActNorm(nn.Module):
    """Per-channel affine; the first batch it sees sets output mean 0 and std 1 per channel."""

    def __init__(self, channels: int):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.log_scale = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.uint8))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if not self.initialised:
            with torch.no_grad():
                self.bias.copy_(-x.mean((0, 2, 3), keepdim=True))
                self.log_scale.copy_(-torch.log(x.std((0, 2, 3), keepdim=True, correction=0) + 1e-6))
                self.initialised.fill_(1)
        h, w = x.shape[2:]
        return (x + self.bias) * torch.exp(self.log_scale), (h * w * self.log_scale.sum()).expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return y * torch.exp(-self.log_scale) - self.bias


class _InvConv(nn.Module):
    """Invertible 1x1 convolution W = P L (U + diag(sign * exp(log_s))), so log|det W| = sum(log_s)."""

    def __init__(self, channels: int):
        super().__init__()
        q = torch.linalg.qr(torch.randn(channels, channels))[0]  # random rotation
        perm, lower, upper = torch.linalg.lu(q)
        diag = torch.diagonal(upper)
        self.register_buffer("perm", perm)
        self.register_buffer("sign", torch.sign(diag))
        self.register_buffer("strict_lower", torch.tril(torch.ones(channels, channels), -1), persistent=False)
        self.lower = nn.Parameter(lower)
        self.upper = nn.Parameter(torch.triu(upper, 1))
        self.log_s = nn.Parameter(torch.log(diag.abs()))

    def weight(self) -> Tensor:
        eye = torch.eye(len(self.sign), dtype=self.lower.dtype, device=self.lower.device)
        lower = self.lower * self.strict_lower + eye
        upper = self.upper * self.strict_lower.T + torch.diag(self.sign * torch.exp(self.log_s))
        return self.perm @ lower @ upper  # (C, C)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h, w = x.shape[2:]
        return F.conv2d(x, self.weight()[:, :, None, None]), (h * w * self.log_s.sum()).expand(x.shape[0])

    def inverse(self, y: Tensor) -> Tensor:
        return F.conv2d(y, torch.linalg.inv(self.weight())[:, :, None, None])


class _Coupling(nn.Module):
    """Affine coupling: the first half of the channels sets a shift and a sigmoid scale for the second half."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(channels // 2, hidden, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1),
            nn.ReLU(),
            _zero_conv(hidden, channels),
        )

    def _shift_scale(self, xa: Tensor) -> tuple[Tensor, Tensor]:
        shift, raw = self.net(xa).chunk(2, dim=1)
        # Glow's sigmoid(raw + 2) (~0.89 at init; at most 1, so training stays stable), lifted off 0 so that the
        # inverse's division cannot overflow (module docstring).
        return shift, SCALE_FLOOR + (1 - SCALE_FLOOR) * torch.sigmoid(raw + 2.0)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        xa, xb = x.chunk(2, dim=1)
        shift, scale = self._shift_scale(xa)
        return torch.cat([xa, (xb + shift) * scale], dim=1), torch.log(scale).sum((1, 2, 3))

    def inverse(self, y: Tensor) -> Tensor:
        ya, yb = y.chunk(2, dim=1)
        shift, scale = self._shift_scale(ya)
        return torch.cat([ya, yb / scale - shift], dim=1)


class Glow(nn.Module):
    likelihood = "exact"  # of the dequantised data; a bound on the discrete likelihood (module docstring)

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        c, size, n_levels = config.channels, config.resolution, config.n_levels
        self.steps = nn.ModuleList()
        for level in range(n_levels):
            width = 4 * c * 2**level  # channels after this level's squeeze
            self.steps.append(
                nn.ModuleList(
                    module
                    for _ in range(config.depth)
                    for module in (_ActNorm(width), _InvConv(width), _Coupling(width, config.hidden))
                )
            )
        # the prior of the half split off at each level but the last, given the half that goes on
        self.split_priors = nn.ModuleList(
            _zero_conv(2 * c * 2**level, 4 * c * 2**level) for level in range(n_levels - 1)
        )
        top = (4 * c * 2 ** (n_levels - 1), size // 2**n_levels, size // 2**n_levels)
        self.top_mean = nn.Parameter(torch.zeros(1, *top))
        self.top_log_std = nn.Parameter(torch.zeros(1, *top))

    def _split_prior(self, level: int, h: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log std of the half split off at `level`, given the half h that goes on."""
        mean, raw = self.split_priors[level](h).chunk(2, dim=1)
        return mean, MAX_LOG_STD - F.softplus(MAX_LOG_STD - raw)  # ~raw below the bound (-0.007 at init)

    def _encode(self, x: Tensor) -> tuple[list[Tensor], Tensor, Tensor]:
        """x in [0, 1] -> (z per level, log|det dz/dx|, log prior of z), both (B,)."""
        self._check(x)
        h = x - 0.5
        logdet = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        log_prior = torch.zeros_like(logdet)
        zs = []
        for level, steps in enumerate(self.steps):
            h = _squeeze(h)
            for step in steps:
                h, ld = step(h)
                logdet = logdet + ld
            if level < len(self.split_priors):
                h, z = h.chunk(2, dim=1)
                mean, log_std = self._split_prior(level, h)
                log_prior = log_prior + _gaussian_log_prob(z, mean, log_std)
                zs.append(z)
        log_prior = log_prior + _gaussian_log_prob(h, self.top_mean, self.top_log_std)
        return [*zs, h], logdet, log_prior

    def _decode(self, top: Tensor, next_z: Callable[[int, Tensor, Tensor], Tensor]) -> Tensor:
        """Inverts the flow from the top latent; next_z(level, mean, log_std) gives each split-off half."""
        h = top
        for level in reversed(range(len(self.steps))):
            if level < len(self.split_priors):
                mean, log_std = self._split_prior(level, h)
                h = torch.cat([h, next_z(level, mean, log_std)], dim=1)
            for step in reversed(self.steps[level]):
                h = step.inverse(h)
            h = _unsqueeze(h)
        return h + 0.5

    def encode(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """Continuous x in [0, 1] -> (latents, finest level first; log|det| of the map), exact inverse of `decode`."""
        zs, logdet, _ = self._encode(x)
        return zs, logdet

    def decode(self, zs: list[Tensor]) -> Tensor:
        return self._decode(zs[-1], lambda level, mean, log_std: zs[level])

    def log_prob(self, x: Tensor) -> Tensor:
        """log density (nats) of continuous x in [0, 1]^D, (B,)."""
        _, logdet, log_prior = self._encode(x)
        return log_prior + logdet

    def dequantise(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        k = 2**self.config.n_bits
        u = torch.rand(x.shape, generator=generator, device=generator.device if generator is not None else x.device)
        return (x * (k - 1) + u.to(x)) / k

    def bits_per_dim(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """-log2 p(x~) / D + n_bits for one dequantisation draw, (B,); see the module docstring."""
        d = x[0].numel()
        return -self.log_prob(self.dequantise(x, generator)) / (d * math.log(2)) + self.config.n_bits

    def loss(self, x: Tensor) -> dict[str, Tensor]:
        d = x[0].numel() * math.log(2)
        _, logdet, log_prior = self._encode(self.dequantise(x))
        bpd = (-(log_prior + logdet) / d + self.config.n_bits).mean()
        return {"loss": bpd, "bits_per_dim": bpd.detach(), "logdet_bpd": (-logdet / d).mean().detach()}

    @torch.no_grad()
    def sample_dequantised(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        """n continuous images x~ (n, C, H, W) from the flow, not clamped; temperature scales the prior stds."""

        def draw(mean: Tensor, log_std: Tensor) -> Tensor:
            source = generator.device if generator is not None else mean.device
            eps = torch.randn(mean.shape, generator=generator, device=source).to(mean)
            return mean + temperature * torch.exp(log_std) * eps

        top = draw(self.top_mean.expand(n, -1, -1, -1), self.top_log_std.expand(n, -1, -1, -1))
        return self._decode(top, lambda level, mean, log_std: draw(mean, log_std))

    def sample(self, n: int, generator: torch.Generator | None = None, temperature: float = 1.0) -> Tensor:
        """n images (n, C, H, W) on the n_bits grid in [0, 1]: the cell each x~ falls in."""
        k = 2**self.config.n_bits
        x = self.sample_dequantised(n, generator, temperature)
        return torch.floor(x * k).clamp(0, k - 1) / (k - 1)  # mass outside [0, 1)^D goes to the nearest cell

    def evals_per_sample(self, n: int = 1) -> int:
        """One inverse pass per image, whatever the batch n."""
        return 1

    def _check(self, x: Tensor) -> None:
        cfg = self.config
        expected = (cfg.channels, cfg.resolution, cfg.resolution)
        if tuple(x.shape[1:]) != expected:
            raise UserError(
                f"glow: expected images of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )


def build(resolution: int, channels: int, n_bits: int, **overrides) -> Glow:
    config = strict_config("glow", Config, overrides, resolution=resolution, channels=channels, n_bits=n_bits)
    for f in fields(Config):
        value = getattr(config, f.name)
        if type(value) is not int or value < 1:
            raise UserError(f"glow: option {f.name} must be a positive int, got {value!r}")
    if resolution % 2**config.n_levels:
        raise UserError(
            f"glow: resolution {resolution} is not divisible by 2**n_levels = {2**config.n_levels}; "
            "change the resolution or n_levels"
        )
    return Glow(config)
