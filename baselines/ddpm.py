"""Pixel-space denoising diffusion: Ho, Jain & Abbeel, "Denoising Diffusion Probabilistic Models" (2020).

The network is a diffusers `UNet2DModel` predicting the noise; the forward process and every sampler are diffusers
schedulers: `DDPMScheduler` for training, and for sampling any name of the project's one sampler registry
(`pipelines.samplers`: "ddpm" is the paper's ancestral sampler, "ddim", "dpmpp-2m", "euler-a", ...).
Training minimises L_simple. `bits_per_dim` is the variational bound of the paper (eq. 5) on the discrete data:

    L_T + sum_{t=2..T} L_{t-1} + L_0,

with the sum over t taken exactly (every one of the `num_train_timesteps` terms, each at one draw of x_t ~ q), the
reverse variances fixed to the posterior variances (diffusers' "fixed_small"), and L_0 a discretised Gaussian
decoder over the 2**n_bits levels with variance beta_1. The bound uses the unclipped reverse mean; the samplers clip
the predicted x_0 to [-1, 1] as diffusers does by default. The bound costs one UNet pass per training timestep.

With few timesteps, prefer a linear schedule with raised beta_start/beta_end to the cosine one: its final beta is
capped at 0.999, so alpha_T is about 0.001 and the last term multiplies the noise-prediction error by ~500; at 4
timesteps that made the bound ~50 times looser (about 200 bits/dim instead of 4 on binary 4x4 images).
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from torch import nn
from torch.special import log_ndtr

from difftune.baselines import strict_config
from difftune.core.errors import UserError
from difftune.pipelines.samplers import make_scheduler

FAMILY = "ddpm"

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
# Steps when none are given: "ddpm" walks every training timestep; the multistep solvers need fewer than the rest.
DEFAULT_STEPS = {"dpmpp-2m": 20, "dpmpp-2m-karras": 20, "dpmpp-sde": 20, "unipc": 20}
OTHER_STEPS = 50


@dataclass
class Config:
    block_out_channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = 1
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000  # a handful is enough for tests
    beta_schedule: str = "linear"  # the paper's: beta_start .. beta_end over 1000 steps
    beta_start: float = 1e-4
    beta_end: float = 0.02  # with few timesteps, raise both (e.g. 0.1 .. 0.6 for 4) so x_T is close to noise
    ema: bool = True  # the training loop keeps an EMA of the weights (diffusers' EMAModel) and ends with it


def make_config(overrides: dict) -> Config:
    """The Config with `overrides`, checked strictly (`baselines.strict_config`)."""
    return strict_config(FAMILY, Config, overrides)


def build(resolution: int = 32, channels: int = 3, n_bits: int = 8, **overrides) -> DDPM:
    config = make_config(overrides)
    factor = 2 ** (len(config.block_out_channels) - 1)
    if resolution % factor:
        raise UserError(f"ddpm: --resolution {resolution} must be divisible by {factor} (one halving per block)")
    if config.beta_schedule not in BETA_SCHEDULES:
        raise UserError(f"ddpm: beta_schedule {config.beta_schedule!r} must be one of {', '.join(BETA_SCHEDULES)}")
    if any(c % config.norm_num_groups for c in config.block_out_channels):
        raise UserError(f"ddpm: block_out_channels must be multiples of norm_num_groups={config.norm_num_groups}")
    return DDPM(config, resolution, channels, n_bits)


def log_discretised_gaussian(x: torch.Tensor, mean: torch.Tensor, std: float, levels: int) -> torch.Tensor:
    """log P(x) per element for a Gaussian rounded to `levels` bins on [-1, 1] (edge bins reach to +-inf)."""
    half = 1.0 / (levels - 1)
    lower = torch.where(x <= -1 + 1e-6, -math.inf, (x - half - mean) / std)
    upper = torch.where(x >= 1 - 1e-6, math.inf, (x + half - mean) / std)
    flip = lower > 0  # in the upper tail, use 1 - Phi for precision
    lo, hi = torch.where(flip, -upper, lower), torch.where(flip, -lower, upper)
    log_hi, log_lo = log_ndtr(hi), log_ndtr(lo)
    return log_hi + torch.log(-torch.expm1(log_lo - log_hi).clamp(max=-1e-300))


class DDPM(nn.Module):
    likelihood = "bound"

    def __init__(self, config: Config, resolution: int, channels: int, n_bits: int):
        super().__init__()
        self.config, self.resolution, self.channels, self.n_bits = config, resolution, channels, n_bits
        self.use_ema = config.ema
        blocks = len(config.block_out_channels)
        self.unet = UNet2DModel(
            sample_size=resolution,
            in_channels=channels,
            out_channels=channels,
            block_out_channels=config.block_out_channels,
            layers_per_block=config.layers_per_block,
            down_block_types=("DownBlock2D",) * blocks,
            up_block_types=("UpBlock2D",) * blocks,
            norm_num_groups=config.norm_num_groups,
        )
        self.scheduler = DDPMScheduler(
            num_train_timesteps=config.num_train_timesteps,
            beta_schedule=config.beta_schedule,
            beta_start=config.beta_start,
            beta_end=config.beta_end,
        )

    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x0 = x * 2 - 1  # (B, C, H, W) in [-1, 1]
        noise = torch.randn_like(x0)
        t = torch.randint(0, self.config.num_train_timesteps, (len(x0),), device=x0.device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        return {"loss": F.mse_loss(self.unet(noisy, t).sample.float(), noise)}

    def sampler(self, scheduler: str = "ddpm", steps: int | None = None):
        """The named sampler (`pipelines.samplers`) on this model's training schedule, its timesteps set."""
        # "trailing" spacing starts at the last training step and never repeats a timestep when steps are few
        sampler = make_scheduler(scheduler, {**self.scheduler.config, "timestep_spacing": "trailing"})
        T = self.config.num_train_timesteps
        default = T if scheduler == "ddpm" else DEFAULT_STEPS.get(scheduler, OTHER_STEPS)
        sampler.set_timesteps(min(steps if steps is not None else default, T), device=self.unet.device)
        return sampler

    def evals_per_sample(self, n: int = 1, scheduler: str = "ddpm", steps: int | None = None) -> int:
        """UNet passes per image: one per sampler timestep (Heun's second-order steps count twice)."""
        return len(self.sampler(scheduler, steps).timesteps)

    @torch.no_grad()
    def sample(
        self, n: int, generator: torch.Generator | None = None, scheduler: str = "ddpm", steps: int | None = None
    ) -> torch.Tensor:
        """n images (n, C, H, W) in [0, 1] on the n_bits grid, drawn with the named sampler."""
        sampler = self.sampler(scheduler, steps)
        # Only the stochastic samplers take a generator in `step` (as diffusers' pipelines check before passing one).
        noise = {"generator": generator} if "generator" in inspect.signature(sampler.step).parameters else {}
        shape = (n, self.channels, self.resolution, self.resolution)
        x = randn_tensor(shape, generator=generator, device=self.unet.device) * sampler.init_noise_sigma
        for t in sampler.timesteps:
            eps = self.unet(sampler.scale_model_input(x, t), t).sample
            x = sampler.step(eps, t, x, **noise).prev_sample
        levels = 2**self.n_bits - 1
        return torch.round(((x + 1) / 2).clamp(0, 1) * levels) / levels

    @torch.no_grad()
    def bits_per_dim(self, x: torch.Tensor) -> torch.Tensor:
        """The negative variational bound (module docstring) in bits/dim, (B,): one UNet pass per timestep."""
        x0 = (x * 2 - 1).double()
        ab = self.scheduler.alphas_cumprod.double().to(x.device)  # ab[i]: alpha-bar of paper step t = i + 1
        betas = self.scheduler.betas.double().to(x.device)
        T = self.config.num_train_timesteps

        def predict_x0(i: int, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            xt = ab[i].sqrt() * x0 + (1 - ab[i]).sqrt() * noise
            t = torch.full((len(x0),), i, device=x.device, dtype=torch.long)
            eps = self.unet(xt.float(), t).sample.double()
            return (xt - (1 - ab[i]).sqrt() * eps) / ab[i].sqrt(), xt

        mean_T, var_T = ab[T - 1].sqrt() * x0, 1 - ab[T - 1]
        nats = 0.5 * (mean_T.pow(2) + var_T - 1 - var_T.log()).flatten(1).sum(1)  # L_T
        for i in range(1, T):  # L_{t-1} for t = 2..T: KL between Gaussians of equal variance
            x0_hat, _ = predict_x0(i, torch.randn_like(x0))
            var = (1 - ab[i - 1]) / (1 - ab[i]) * betas[i]  # posterior variance beta-tilde
            coef = ab[i - 1].sqrt() * betas[i] / (1 - ab[i])  # weight of x_0 in the posterior mean
            nats = nats + (coef**2 * (x0 - x0_hat).pow(2) / (2 * var)).flatten(1).sum(1)
        x0_hat, _ = predict_x0(0, torch.randn_like(x0))  # L_0: discretised Gaussian decoder, variance beta_1
        log_p0 = log_discretised_gaussian(x0, x0_hat, betas[0].sqrt().item(), 2**self.n_bits)
        nats = nats - log_p0.flatten(1).sum(1)
        return (nats / (x0[0].numel() * math.log(2))).float()
