"""A compact StyleGAN: Karras, Laine & Aila, "A Style-Based Generator Architecture for GANs" (2019) and Karras et
al., "Analyzing and Improving the Image Quality of StyleGAN" (StyleGAN2, 2020), in plain PyTorch.

Kept from the papers: the mapping network (z -> w, learning rate x0.01), a learned constant input, modulated and
demodulated convolutions, per-layer noise inputs with learned strengths, style mixing, skip ("toRGB") outputs,
equalised learning rate in the generator, minibatch standard deviation in the discriminator, the non-saturating
logistic loss with lazy R1 on reals, and an EMA of the generator that `sample` uses. Left out for size: path-length
regularisation, the residual discriminator's blur filters, equalised learning rate in the discriminator (plain
layers, so `spectral_norm` applies to them directly), ADA. Options: `spectral_norm` on the discriminator and
`loss="wgan-gp"` (Gulrajani et al. 2017). There is no likelihood; `bits_per_dim` does not exist.

Training is two optimizers stepped by `training_step` itself (the loop's `fit` calls it); it does no fp16 loss
scaling, so train in fp32 or bf16.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm

from difftune.baselines import strict_config
from difftune.core.errors import UserError

FAMILY = "gan"


@dataclass
class Config:
    hidden: int = 64  # channels of every generator and discriminator layer
    style_dim: int = 128  # size of z and w
    n_mlp: int = 4  # layers of the mapping network
    mixing_prob: float = 0.9  # chance a generator batch mixes two styles at a random layer
    loss: str = "logistic"  # or "wgan-gp"
    r1_gamma: float = 1.0  # R1 weight (logistic loss)
    r1_every: int = 16  # lazy regularisation interval
    gp_lambda: float = 10.0  # gradient-penalty weight (wgan-gp)
    spectral_norm: bool = False  # spectral normalisation of every discriminator layer
    ema_decay: float = 0.999  # generator EMA, with a warm-up over the first steps


def make_config(overrides: dict) -> Config:
    """The Config with `overrides`, checked strictly (`baselines.strict_config`)."""
    return strict_config(FAMILY, Config, overrides)


def build(resolution: int = 32, channels: int = 3, n_bits: int = 8, **overrides) -> StyleGAN:
    config = make_config(overrides)
    if resolution < 4 or resolution & (resolution - 1):
        raise UserError(f"gan: --resolution {resolution} must be a power of two, at least 4")
    if config.loss not in ("logistic", "wgan-gp"):
        raise UserError(f"gan: loss {config.loss!r} must be 'logistic' or 'wgan-gp'")
    return StyleGAN(config, resolution, channels, n_bits)


class EqualLinear(nn.Module):
    """Linear layer with equalised learning rate: weights stored at unit scale, scaled at run time."""

    def __init__(self, n_in: int, n_out: int, bias_init: float = 0.0, lr_mul: float = 1.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / lr_mul)
        self.bias = nn.Parameter(torch.full((n_out,), bias_init / lr_mul))
        self.scale, self.lr_mul = lr_mul / math.sqrt(n_in), lr_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.scale, self.bias * self.lr_mul)


class ModulatedConv(nn.Module):
    """StyleGAN2's convolution: the style scales the weight's input channels, demodulation renormalises outputs."""

    def __init__(self, n_in: int, n_out: int, kernel: int, style_dim: int, demodulate: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in, kernel, kernel))
        self.scale = 1 / math.sqrt(n_in * kernel * kernel)
        self.affine = EqualLinear(style_dim, n_in, bias_init=1.0)
        self.demodulate, self.padding = demodulate, kernel // 2

    def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        style = self.affine(w)  # (B, C_in)
        weight = self.weight[None] * self.scale * style[:, None, :, None, None]  # (B, C_out, C_in, k, k)
        if self.demodulate:
            weight = weight * torch.rsqrt(weight.pow(2).sum(dim=(2, 3, 4), keepdim=True) + 1e-8)
        # One grouped convolution applies each sample's own weights.
        out = F.conv2d(x.reshape(1, B * C, H, W), weight.flatten(0, 1), padding=self.padding, groups=B)
        return out.reshape(B, -1, H, W)


class StyledLayer(nn.Module):
    """Modulated 3x3 conv, scaled per-pixel noise, bias, leaky ReLU."""

    def __init__(self, n_in: int, n_out: int, style_dim: int):
        super().__init__()
        self.conv = ModulatedConv(n_in, n_out, 3, style_dim)
        self.noise_strength = nn.Parameter(torch.zeros(()))
        self.bias = nn.Parameter(torch.zeros(1, n_out, 1, 1))

    def forward(self, x: torch.Tensor, w: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        x = self.conv(x, w)
        noise = randn_tensor((x.shape[0], 1, *x.shape[2:]), generator=generator, device=x.device, dtype=x.dtype)
        return F.leaky_relu(x + self.noise_strength * noise + self.bias, 0.2) * math.sqrt(2)


class Generator(nn.Module):
    def __init__(self, config: Config, resolution: int, channels: int):
        super().__init__()
        c, s = config.hidden, config.style_dim
        layers = [EqualLinear(s, s, lr_mul=0.01) for _ in range(config.n_mlp)]
        self.mapping = nn.ModuleList(layers)
        self.const = nn.Parameter(torch.randn(1, c, 4, 4))
        n_up = int(math.log2(resolution)) - 2
        self.convs = nn.ModuleList([StyledLayer(c, c, s)] + [StyledLayer(c, c, s) for _ in range(2 * n_up)])
        self.to_rgb = nn.ModuleList([ModulatedConv(c, channels, 1, s, demodulate=False) for _ in range(n_up + 1)])
        self.n_up, self.style_dim = n_up, s
        self.n_styles = 1 + 2 * n_up + 1  # convs, plus the last toRGB; earlier toRGBs share their conv's style

    def map(self, z: torch.Tensor) -> torch.Tensor:
        w = z * torch.rsqrt(z.pow(2).mean(dim=1, keepdim=True) + 1e-8)  # pixel norm
        for layer in self.mapping:
            w = F.leaky_relu(layer(w), 0.2) * math.sqrt(2)
        return w

    def forward(self, ws: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """ws (B, n_styles, style_dim), one w per layer -> images (B, C, H, W) around [-1, 1]."""
        x = self.convs[0](self.const.expand(len(ws), -1, -1, -1), ws[:, 0], generator)
        rgb = self.to_rgb[0](x, ws[:, 1])
        for i in range(self.n_up):
            x = F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False)
            x = self.convs[1 + 2 * i](x, ws[:, 1 + 2 * i], generator)
            x = self.convs[2 + 2 * i](x, ws[:, 2 + 2 * i], generator)
            rgb = F.interpolate(rgb, scale_factor=2, mode="bilinear", align_corners=False)
            rgb = rgb + self.to_rgb[i + 1](x, ws[:, 3 + 2 * i])
        return rgb


class Discriminator(nn.Module):
    def __init__(self, config: Config, resolution: int, channels: int):
        super().__init__()
        c = config.hidden
        wrap = spectral_norm if config.spectral_norm else (lambda module: module)
        blocks = [wrap(nn.Conv2d(channels, c, 1)), nn.LeakyReLU(0.2)]
        for _ in range(int(math.log2(resolution)) - 2):
            blocks += [wrap(nn.Conv2d(c, c, 3, padding=1)), nn.LeakyReLU(0.2), wrap(nn.Conv2d(c, c, 3, padding=1))]
            blocks += [nn.LeakyReLU(0.2), nn.AvgPool2d(2)]
        self.blocks = nn.Sequential(*blocks)
        self.final = nn.Sequential(
            wrap(nn.Conv2d(c + 1, c, 3, padding=1)), nn.LeakyReLU(0.2), nn.Flatten(),
            wrap(nn.Linear(c * 16, c)), nn.LeakyReLU(0.2), wrap(nn.Linear(c, 1)),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(x)  # (B, c, 4, 4)
        B, C, H, W = x.shape
        group = min(4, B)
        while B % group:
            group -= 1
        # Minibatch standard deviation: how varied each group of `group` samples is, as one extra feature map.
        # sqrt(var + 1e-8) as in StyleGAN2, not .std(): the gradient of sqrt at 0 is 0 / 0 = NaN, and a group of
        # identical features (plain white backgrounds after a few steps) has variance exactly 0.
        var = x.reshape(group, -1, C, H, W).var(dim=0, unbiased=False)  # (B / group, C, H, W)
        std = (var + 1e-8).sqrt().mean(dim=(1, 2, 3))  # (B / group,)
        std = std.repeat(group).reshape(B, 1, 1, 1).expand(B, 1, H, W)
        return self.final(torch.cat([x, std], dim=1)).squeeze(1)


class StyleGAN(nn.Module):
    likelihood = "none"
    use_ema = False  # the generator EMA is kept here, not by the training loop

    def __init__(self, config: Config, resolution: int, channels: int, n_bits: int):
        super().__init__()
        self.config, self.resolution, self.channels, self.n_bits = config, resolution, channels, n_bits
        self.generator = Generator(config, resolution, channels)
        self.discriminator = Discriminator(config, resolution, channels)
        self.generator_ema = copy.deepcopy(self.generator).requires_grad_(False)

    def styles(self, n: int, device, generator: torch.Generator | None = None, mix: bool = False) -> torch.Tensor:
        """(n, n_styles, style_dim): one w for every layer, or two w's crossing over at a random layer."""
        G, k = self.generator, self.generator.n_styles
        z = randn_tensor((2 if mix else 1, n, G.style_dim), generator=generator, device=device)
        w = torch.stack([G.map(zi) for zi in z])  # (1 or 2, n, style_dim)
        ws = w[0, :, None].expand(n, k, -1)
        if mix:
            cross = int(torch.randint(1, k, ()))
            ws = torch.cat([ws[:, :cross], w[1, :, None].expand(n, k - cross, -1)], dim=1)
        return ws

    def fake(self, n: int, device) -> torch.Tensor:
        mix = bool(torch.rand(()) < self.config.mixing_prob)
        return self.generator(self.styles(n, device, mix=mix))

    def configure_optimizers(self, lr: float) -> list[torch.optim.Optimizer]:
        return [
            torch.optim.Adam(self.generator.parameters(), lr=lr, betas=(0.0, 0.99)),
            torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=(0.0, 0.99)),
        ]

    def _d_loss(self, real: torch.Tensor, fake: torch.Tensor, regularise: bool) -> dict[str, torch.Tensor]:
        D, cfg = self.discriminator, self.config
        if cfg.loss == "logistic":
            loss = F.softplus(D(fake)).mean() + F.softplus(-D(real)).mean()
            if not regularise:
                return {"d_loss": loss}
            real = real.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(D(real).sum(), real, create_graph=True)
            r1 = grad.pow(2).flatten(1).sum(1).mean()
            return {"d_loss": loss, "r1": r1, "d_total": loss + cfg.r1_gamma / 2 * r1 * cfg.r1_every}
        real_score = D(real)
        loss = D(fake).mean() - real_score.mean() + 1e-3 * real_score.pow(2).mean()  # drift term keeps D near 0
        if not regularise:
            return {"d_loss": loss}
        t = torch.rand(len(real), 1, 1, 1, device=real.device)
        mixed = (t * real + (1 - t) * fake.detach()).requires_grad_(True)
        (grad,) = torch.autograd.grad(D(mixed).sum(), mixed, create_graph=True)
        gp = (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()
        return {"d_loss": loss, "gp": gp, "d_total": loss + cfg.gp_lambda * gp}

    def training_step(self, x: torch.Tensor, optimizers: list[torch.optim.Optimizer], step: int) -> dict:
        """One discriminator step then one generator step (each its own backward and optimizer step), then EMA."""
        opt_g, opt_d = optimizers
        real = x * 2 - 1
        regularise = self.config.loss == "wgan-gp" or step % self.config.r1_every == 0
        with torch.no_grad():
            fake = self.fake(len(x), x.device)
        terms = self._d_loss(real, fake, regularise)
        opt_d.zero_grad(set_to_none=True)
        terms.get("d_total", terms["d_loss"]).backward()
        opt_d.step()

        fake_score = self.discriminator(self.fake(len(x), x.device))
        g_loss = F.softplus(-fake_score).mean() if self.config.loss == "logistic" else -fake_score.mean()
        opt_g.zero_grad(set_to_none=True)
        g_loss.backward()
        opt_g.step()
        self.discriminator.zero_grad(set_to_none=True)  # the generator's backward left gradients there
        self.update_ema(step)
        out = {k: v.detach() for k, v in terms.items() if k != "d_total"}
        return {"loss": out["d_loss"] + g_loss.detach(), "g_loss": g_loss.detach(), **out}

    @torch.no_grad()
    def update_ema(self, step: int) -> None:
        decay = min(self.config.ema_decay, (1 + step) / (10 + step))  # warm-up: follow closely at first
        for ema, live in zip(self.generator_ema.parameters(), self.generator.parameters(), strict=True):
            ema.lerp_(live, 1 - decay)

    @torch.no_grad()
    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Both players' losses on this batch (no regularisers, no step), for logging and evaluation."""
        fake = self.fake(len(x), x.device)
        terms = self._d_loss(x * 2 - 1, fake, regularise=False)
        score = self.discriminator(fake)
        g_loss = F.softplus(-score).mean() if self.config.loss == "logistic" else -score.mean()
        return {"loss": terms["d_loss"] + g_loss, "g_loss": g_loss, "d_loss": terms["d_loss"]}

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n images (n, C, H, W) in [0, 1] on the n_bits grid from the EMA generator; `generator` seeds all noise."""
        device = self.generator_ema.const.device
        z = randn_tensor((n, self.generator.style_dim), generator=generator, device=device)  # any generator device
        ws = self.generator_ema.map(z)[:, None].expand(n, self.generator.n_styles, -1)
        x = ((self.generator_ema(ws, generator) + 1) / 2).clamp(0, 1)
        levels = 2**self.n_bits - 1
        return torch.round(x * levels) / levels

    def evals_per_sample(self, n: int = 1) -> int:
        return 1
