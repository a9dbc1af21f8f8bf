"""Gated PixelCNN: an autoregressive model with an exact likelihood of the discrete image.

Follows van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders": a vertical stack (rows
above) and a horizontal stack (the current row, left of the pixel) joined by gated tanh * sigmoid units, so the
receptive field has no blind spot; class conditioning is a learned bias on every gate. Inside a pixel the colour
channels are ordered as in van den Oord et al. 2016, "Pixel Recurrent Neural Networks": the features are split into
one group per channel, and the masks let R see nothing of its own pixel, G see R, and B see R and G.

Each subpixel gets either a 2**n_bits-way softmax (``output="softmax"``) or a discretised logistic mixture
(``output="logistic"``, Salimans et al. 2017, "PixelCNN++"). The mixture is applied to each channel under the channel
mask, not PixelCNN++'s joint mixture with linear channel coupling; its bin probabilities are computed in closed form
without PixelCNN++'s mid-point shortcut, so they sum to one.

`bits_per_dim(x)` is the exact negative log-likelihood of the discrete image, -log2 p(x) / D. Sampling is batched
over images and takes H * W * C network passes, one per subpixel. Each pass runs on a band of rows only: a row's
outputs depend on the `reach` = layers * (kernel // 2) + 1 rows above it and no others (each vertical convolution
looks kernel // 2 rows up, the shift into the horizontal stack one more), so the rows above the band cannot change
them. At 32 px with 5 layers of kernel 3 a pass then costs 7 rows instead of 32; the samples are the same as from
full passes (tests/baselines/test_pixelcnn.py compares the two).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from difftune.baselines import strict_config
from difftune.core.errors import UserError

OUTPUTS = ("softmax", "logistic")


@dataclass
class Config:
    resolution: int = 32
    channels: int = 3
    n_bits: int = 8
    hidden: int = 128  # features per stack, split evenly among the colour channels
    layers: int = 12  # gated layers
    kernel: int = 5  # odd; vertical kernels are (kernel//2 + 1) x kernel, horizontal 1 x (kernel//2 + 1)
    output: str = "softmax"  # "softmax" or "logistic"
    n_mix: int = 5  # logistic mixture components per subpixel (output="logistic")
    num_classes: int = 0  # > 0 makes the model class-conditional


def _groups(n: int, channels: int) -> Tensor:
    """Colour channel that each of n features belongs to: contiguous, near-equal blocks."""
    return torch.arange(n) * channels // n


def _down_shift(x: Tensor) -> Tensor:
    """Moves every row down by one, so row i holds what row i - 1 saw (rows < i only)."""
    return F.pad(x, (0, 0, 1, 0))[:, :, :-1]


def _gate(x: Tensor) -> Tensor:
    a, b = x.chunk(2, dim=1)
    return torch.tanh(a) * torch.sigmoid(b)


class _RowConv(nn.Conv2d):
    """1 x width convolution over columns <= j of the current row. At column j itself the mask lets an output of
    colour group g see input groups < g (strict, the first layer) or <= g (every later layer)."""

    def __init__(self, cin: int, cout: int, width: int, in_groups: Tensor, out_groups: Tensor, strict: bool):
        super().__init__(cin, cout, (1, width))
        allowed = out_groups[:, None] > in_groups[None, :] if strict else out_groups[:, None] >= in_groups[None, :]
        mask = torch.ones_like(self.weight)  # (cout, cin, 1, width)
        mask[:, :, 0, -1] = allowed.float()
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, (self.kernel_size[1] - 1, 0, 0, 0)), self.weight * self.mask, self.bias)


class _GatedLayer(nn.Module):
    def __init__(self, cin: int, config: Config, first: bool):
        super().__init__()
        hidden, k, c = config.hidden, config.kernel, config.channels
        self.kernel, self.first = k, first
        gate_groups = _groups(hidden, c).repeat(2)  # tanh half and sigmoid half share the grouping
        self.v_conv = nn.Conv2d(cin, 2 * hidden, (k // 2 + 1, k))
        self.v_to_h = nn.Conv2d(2 * hidden, 2 * hidden, 1)
        self.h_conv = _RowConv(cin, 2 * hidden, k // 2 + 1, _groups(cin, c), gate_groups, strict=first)
        self.h_out = _RowConv(hidden, hidden, 1, _groups(hidden, c), _groups(hidden, c), strict=False)
        self.embed = nn.Embedding(config.num_classes, 2 * hidden) if config.num_classes else None

    def forward(self, v: Tensor, h: Tensor, y: Tensor | None) -> tuple[Tensor, Tensor]:
        k = self.kernel
        v_pre = self.v_conv(F.pad(v, (k // 2, k // 2, k // 2, 0)))  # row i sees rows <= i, every column near j
        h_pre = self.h_conv(h) + self.v_to_h(_down_shift(v_pre))  # the shift keeps row i out of the row stack
        if self.embed is not None:
            bias = self.embed(y)[:, :, None, None]  # (B, 2 * hidden, 1, 1)
            v_pre, h_pre = v_pre + bias, h_pre + bias
        h_new = self.h_out(_gate(h_pre))
        return _gate(v_pre), h_new if self.first else h + h_new


class PixelCNN(nn.Module):
    likelihood = "exact"

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        c, hidden = config.channels, config.hidden
        self.n_params = 2**config.n_bits if config.output == "softmax" else 3 * config.n_mix
        self.layers = nn.ModuleList(
            _GatedLayer(c if i == 0 else hidden, config, first=i == 0) for i in range(config.layers)
        )
        out_groups = torch.arange(c).repeat_interleave(self.n_params)  # matches "(c p)" below
        self.head = nn.Sequential(
            nn.ELU(),
            _RowConv(hidden, hidden, 1, _groups(hidden, c), _groups(hidden, c), strict=False),
            nn.ELU(),
            _RowConv(hidden, c * self.n_params, 1, _groups(hidden, c), out_groups, strict=False),
        )

    @property
    def reach(self) -> int:
        """Rows above a pixel that its distribution depends on (module docstring)."""
        return self.config.layers * (self.config.kernel // 2) + 1

    def params(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Distribution parameters (B, C, H, W, P) of every subpixel given the subpixels before it."""
        self._check(x, y)
        return self._params(x, y)

    def _params(self, x: Tensor, y: Tensor | None) -> Tensor:
        """`params` of any number of rows (a band of the image: its first row sees zeros above it)."""
        v = h = 2 * x - 1
        for layer in self.layers:
            v, h = layer(v, h, y)
        return rearrange(self.head(h), "b (c p) h w -> b c h w p", p=self.n_params)

    def log_prob(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """log p of each subpixel given its predecessors, (B, C, H, W), in nats."""
        top = 2**self.config.n_bits - 1
        k = torch.round(x * top).long()  # (B, C, H, W) bin indices
        p = self.params(x, y)
        if self.config.output == "softmax":
            return torch.log_softmax(p, dim=-1).gather(-1, k[..., None])[..., 0]
        logit, mean, log_scale = p.chunk(3, dim=-1)  # (B, C, H, W, n_mix) each
        inv_scale = torch.exp(-log_scale.clamp(-7.0, 7.0))
        centre = (2 * k.to(p.dtype) / top - 1)[..., None]
        lo = (centre - 1 / top - mean) * inv_scale  # standardised bin edges; bin width 2 / top in [-1, 1]
        hi = (centre + 1 / top - mean) * inv_scale
        # sigmoid(hi) - sigmoid(lo) = sigmoid(hi) * sigmoid(-lo) * (1 - exp(lo - hi)), stable in logs
        middle = F.logsigmoid(hi) + F.logsigmoid(-lo) + torch.log(-torch.expm1(-2 / top * inv_scale))
        edge = k[..., None]
        log_bin = torch.where(edge == 0, F.logsigmoid(hi), torch.where(edge == top, F.logsigmoid(-lo), middle))
        return torch.logsumexp(torch.log_softmax(logit, dim=-1) + log_bin, dim=-1)

    def bits_per_dim(self, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Exact -log2 p(x) / D of each discrete image, (B,)."""
        return -self.log_prob(x, y).flatten(1).sum(1) / (x[0].numel() * math.log(2))

    def loss(self, x: Tensor, y: Tensor | None = None) -> dict[str, Tensor]:
        bpd = self.bits_per_dim(x, y).mean()
        return {"loss": bpd, "bits_per_dim": bpd.detach()}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None, y: Tensor | None = None) -> Tensor:
        """n images (n, C, H, W) in [0, 1]; a class-conditional model without y draws classes uniformly."""
        cfg = self.config
        device = next(self.parameters()).device
        if cfg.num_classes and y is None:
            y = self._uniform((n,), generator, device).mul(cfg.num_classes).long().clamp(max=cfg.num_classes - 1)
        x = torch.zeros(n, cfg.channels, cfg.resolution, cfg.resolution, device=device)
        for i in range(cfg.resolution):
            top = max(0, i - self.reach)  # the rows row i depends on: the band [top, i]
            for j in range(cfg.resolution):
                for c in range(cfg.channels):
                    p = self._params(x[:, :, top : i + 1], y)[:, c, -1, j]  # (n, P) of subpixel (c, i, j)
                    x[:, c, i, j] = self._draw(p, generator) / (2**cfg.n_bits - 1)
        return x

    def _draw(self, p: Tensor, generator: torch.Generator | None) -> Tensor:
        """One bin index per row of parameters p (n, P), as float."""
        top = 2**self.config.n_bits - 1
        if self.config.output == "softmax":
            return self._gumbel_argmax(p, generator).float()
        logit, mean, log_scale = p.chunk(3, dim=-1)
        pick = self._gumbel_argmax(logit, generator)[:, None]
        mean, log_scale = mean.gather(1, pick)[:, 0], log_scale.clamp(-7.0, 7.0).gather(1, pick)[:, 0]
        u = self._uniform(mean.shape, generator, p.device).clamp(1e-6, 1 - 1e-6)
        value = mean + torch.exp(log_scale) * (torch.log(u) - torch.log1p(-u))  # logistic sample in [-1, 1] units
        # rounding to the nearest centre, edges open to +-inf, is exactly the discretised distribution
        return torch.round((value + 1) / 2 * top).clamp(0, top)

    def _gumbel_argmax(self, logits: Tensor, generator: torch.Generator | None) -> Tensor:
        u = self._uniform(logits.shape, generator, logits.device).clamp(1e-10, 1 - 1e-7)
        return torch.argmax(logits - torch.log(-torch.log(u)), dim=-1)

    @staticmethod
    def _uniform(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> Tensor:
        source = generator.device if generator is not None else device
        return torch.rand(shape, generator=generator, device=source).to(device)

    def evals_per_sample(self, n: int = 1) -> int:
        """Network passes per image: one per subpixel, whatever the batch n."""
        return self.config.resolution**2 * self.config.channels

    def _check(self, x: Tensor, y: Tensor | None) -> None:
        cfg = self.config
        expected = (cfg.channels, cfg.resolution, cfg.resolution)
        if tuple(x.shape[1:]) != expected:
            raise UserError(
                f"pixelcnn: expected images of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )
        if cfg.num_classes and y is None:
            raise UserError(f"pixelcnn: the model is class-conditional (num_classes={cfg.num_classes}); pass labels y")
        if not cfg.num_classes and y is not None:
            raise UserError("pixelcnn: labels y given to an unconditional model; build it with num_classes")


def build(resolution: int, channels: int, n_bits: int, **overrides) -> PixelCNN:
    config = strict_config("pixelcnn", Config, overrides, resolution=resolution, channels=channels, n_bits=n_bits)
    if config.output not in OUTPUTS:
        raise UserError(f"pixelcnn: output must be one of {', '.join(OUTPUTS)}, got {config.output!r}")
    if config.kernel < 3 or config.kernel % 2 == 0:
        raise UserError(f"pixelcnn: kernel must be odd and >= 3, got {config.kernel}")
    if config.hidden < channels:
        raise UserError(f"pixelcnn: hidden ({config.hidden}) must be at least channels ({channels})")
    for name in ("resolution", "channels", "n_bits", "layers", "n_mix"):
        if getattr(config, name) < 1:
            raise UserError(f"pixelcnn: {name} must be >= 1, got {getattr(config, name)}")
    if config.num_classes < 0:
        raise UserError(f"pixelcnn: num_classes must be >= 0 (0: unconditional), got {config.num_classes}")
    return PixelCNN(config)
