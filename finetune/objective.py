"""The training objectives, one loss function each, looked up by the family's `objective`.

- "ddpm" (SD 1.x/2.x, SDXL): noise and timesteps per sample, epsilon or v targets, and their weighting, with the
  options the literature users know: min-SNR-gamma weighting (Hang et al. 2023, via diffusers' `compute_snr`),
  noise offset (Guttenberg 2023), input perturbation (Ning et al. 2023), timestep bias (diffusers' SDXL script),
  zero terminal SNR (Lin et al. 2024, through the scheduler's `rescale_betas_zero_snr`).
- "flow" (SD 3/3.5, Flux): rectified flow (Liu et al. 2022; Esser et al. 2024) as diffusers' SD3/Flux scripts
  train it: x_t = (1 - sigma) x_0 + sigma eps, target eps - x_0 (or, with `--precondition_outputs 1`, the output
  mapped back to x_0), sigma drawn by `compute_density_for_timestep_sampling` and looked up in the scheduler's
  (shifted) sigmas, loss weights by `compute_loss_weighting_for_sd3`; kohya's `--timestep_sampling
  uniform|sigmoid|shift|flux_shift` draw sigma directly.
Every draw of a sample comes from its own seed, so it does not depend on the batch or process it lands in.
A loss mask (B, 1, h, w) on the latent grid weighs each element before the mean, as kohya's masked loss does (not
renormalised: a half mask halves the sample's loss), so a zero region gives no gradient.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from difftune.core.config import REFUSED, option, require
from difftune.core.errors import UserError

if TYPE_CHECKING:
    from diffusers import DDPMScheduler

# diffusers' training utilities are imported where the losses use them: this module's config is read before any
# model loads, and `--help` should not wait for diffusers.
FLOW_WEIGHTING = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")  # diffusers' compute_density/weighting
DDPM, FLOW = ("ddpm",), ("flow",)


@dataclass
class ObjectiveConfig:
    """The loss: the DDPM options (SD 1.x/2.x, SDXL) and the rectified-flow options (SD 3/3.5, Flux and the other
    flow transformers), flag names of diffusers' scripts and kohya's. Each applies to its objective only."""

    snr_gamma: float | None = option("Min-SNR weighting gamma (5.0 is usual); off when unset.", default=None,
                                     resume=REFUSED, card=True, families=DDPM)  # fmt: skip
    noise_offset: float = option("Noise offset (0.05-0.1 helps very dark/bright images).", default=0.0,
                                 resume=REFUSED, card=True, families=DDPM)  # fmt: skip
    input_perturbation: float = option("Input perturbation of the noise (0.1 is usual).", default=0.0,
                                       resume=REFUSED, card=True, families=DDPM)  # fmt: skip
    timestep_bias_strategy: str = option(
        "Sample some timesteps more.", default="none", choices=("none", "earlier", "later", "range"), resume=REFUSED,
        card=False, families=DDPM,
    )  # fmt: skip
    timestep_bias_multiplier: float = option("Weight of the favoured timesteps.", default=1.0, resume=REFUSED,
                                             card=False, families=DDPM)  # fmt: skip
    timestep_bias_begin: int = option("With 'range': first favoured timestep.", default=0, resume=REFUSED,
                                      card=False, families=DDPM)  # fmt: skip
    timestep_bias_end: int = option("With 'range': last favoured timestep.", default=1000, resume=REFUSED,
                                    card=False, families=DDPM)  # fmt: skip
    timestep_bias_portion: float = option("With earlier/later: fraction of timesteps favoured.", default=0.25,
                                          resume=REFUSED, card=False, families=DDPM)  # fmt: skip
    weighting_scheme: str = option(
        "Flow timestep density (logit_normal, mode) or loss weighting (sigma_sqrt, cosmap).", default="none",
        choices=FLOW_WEIGHTING, resume=REFUSED, card=True, families=FLOW,
    )  # fmt: skip
    logit_mean: float = option("logit_normal: mean.", default=0.0, resume=REFUSED, card=False, families=FLOW)
    logit_std: float = option("logit_normal: standard deviation.", default=1.0, resume=REFUSED, card=False,
                              families=FLOW)  # fmt: skip
    mode_scale: float = option("mode: scale of the mode-seeking density.", default=1.29, resume=REFUSED, card=False,
                               families=FLOW)  # fmt: skip
    precondition_outputs: int = option(
        "1: compare pred x (-sigma) + x_t with x_0 (SD3's option); 0: eps - x_0.", default=0, resume=REFUSED,
        card=False, families=FLOW,
    )  # fmt: skip
    timestep_sampling: str = option(
        "kohya's flow timestep sampling; sigma: the scheduler's sigmas at --weighting_scheme's density.",
        default="sigma", choices=("sigma", "uniform", "sigmoid", "shift", "flux_shift"), resume=REFUSED, card=True,
        families=FLOW,
    )  # fmt: skip
    sigmoid_scale: float = option("sigmoid/shift/flux_shift: scale of the normal draw before the sigmoid.",
                                  default=1.0, resume=REFUSED, card=False, families=FLOW)  # fmt: skip
    discrete_flow_shift: float | None = option("shift: the sigma shift; default: the scheduler's `shift`.",
                                               default=None, resume=REFUSED, card=False, families=FLOW)  # fmt: skip

    def validate(self) -> None:
        checks = [
            (self.snr_gamma is None or self.snr_gamma > 0, "--snr_gamma must be positive"),
            (0 < self.timestep_bias_portion < 1, "--timestep_bias_portion must be within (0, 1)"),
            (self.timestep_bias_begin < self.timestep_bias_end, "--timestep_bias_begin must be below --timestep_bias_end"),
            (self.logit_std > 0, "--logit_std must be positive"),
            (self.precondition_outputs in (0, 1), "--precondition_outputs must be 0 or 1"),
            (self.discrete_flow_shift is None or self.discrete_flow_shift > 0, "--discrete_flow_shift must be positive"),
        ]  # fmt: skip
        require(checks)


def timestep_bias_weights(cfg: ObjectiveConfig, num_timesteps: int) -> torch.Tensor | None:
    """Sampling weights over timesteps for `--timestep_bias_strategy` (diffusers' SDXL script's options).

    earlier/later: the first/last `portion` of timesteps get `multiplier` times the weight; range: those in
    [begin, end). None means uniform."""
    if cfg.timestep_bias_strategy == "none" or cfg.timestep_bias_multiplier == 1.0:
        return None
    weights = torch.ones(num_timesteps)
    n = int(num_timesteps * cfg.timestep_bias_portion)
    if cfg.timestep_bias_strategy == "earlier":
        favoured = slice(0, n)
    elif cfg.timestep_bias_strategy == "later":
        favoured = slice(num_timesteps - n, num_timesteps)
    else:
        favoured = slice(max(0, cfg.timestep_bias_begin), min(num_timesteps, cfg.timestep_bias_end))
    weights[favoured] *= cfg.timestep_bias_multiplier
    return weights / weights.sum()


def draw_noise(
    seeds: torch.Tensor,
    shape: tuple[int, ...],
    num_timesteps: int,
    noise_offset: float,
    input_perturbation: float,
    timestep_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample noise (B, C, h, w), the noise added to latents (perturbed), and timesteps (B,).

    Each sample's draws come from its own seed, so they do not depend on which batch or process it lands in.
    """
    noises, noisy_noises, timesteps = [], [], []
    for seed in seeds.tolist():
        g = torch.Generator().manual_seed(int(seed))
        noise = torch.randn(shape, generator=g)
        if noise_offset:
            noise = noise + noise_offset * torch.randn((shape[0], 1, 1), generator=g)
        perturbed = noise + input_perturbation * torch.randn(shape, generator=g) if input_perturbation else noise
        noises.append(noise)
        noisy_noises.append(perturbed)
        if timestep_weights is None:
            timesteps.append(torch.randint(0, num_timesteps, (1,), generator=g))
        else:
            timesteps.append(torch.multinomial(timestep_weights, 1, generator=g))
    return torch.stack(noises), torch.stack(noisy_noises), torch.cat(timesteps)


@dataclass
class Objective:
    """The objective's settings, resolved once from the config and the family's noise scheduler."""

    noise_offset: float = 0.0
    input_perturbation: float = 0.0
    snr_gamma: float | None = None
    timestep_weights: torch.Tensor | None = None  # sampling weights over timesteps; None: uniform
    weighting_scheme: str = "none"  # flow: the density of sigma, or the loss weighting
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = False
    timestep_sampling: str = "sigma"
    sigmoid_scale: float = 1.0
    discrete_flow_shift: float | None = None

    @classmethod
    def from_config(cls, cfg: ObjectiveConfig, scheduler) -> Objective:
        weights = timestep_bias_weights(cfg, scheduler.config.num_train_timesteps)
        return cls(
            cfg.noise_offset, cfg.input_perturbation, cfg.snr_gamma, weights, cfg.weighting_scheme, cfg.logit_mean,
            cfg.logit_std, cfg.mode_scale, bool(cfg.precondition_outputs), cfg.timestep_sampling, cfg.sigmoid_scale,
            cfg.discrete_flow_shift,
        )  # fmt: skip


def diffusion_loss(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    seeds: torch.Tensor,
    objective: Objective,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample losses (B,) of latents (B, C, h, w) under a DDPM schedule; `predict(noisy, timesteps)` calls the
    denoiser. The target is epsilon or v, as the scheduler's `prediction_type` says; `mask` (B, 1, h, w) weighs
    each element."""
    noise, noise_in, timesteps = draw_noise(
        seeds, tuple(latents.shape[1:]), scheduler.config.num_train_timesteps, objective.noise_offset,
        objective.input_perturbation, objective.timestep_weights,
    )  # fmt: skip
    noise, noise_in, timesteps = noise.to(latents), noise_in.to(latents), timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise_in, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise UserError(f"unsupported prediction_type {scheduler.config.prediction_type!r}: epsilon or v_prediction")
    pred = predict(noisy, timesteps)
    per_sample = masked_mean(F.mse_loss(pred.float(), target.float(), reduction="none"), mask)  # (B,)
    if objective.snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(scheduler, timesteps)
        if scheduler.config.prediction_type == "v_prediction":
            weight = torch.clamp(snr, max=objective.snr_gamma) / (snr + 1)  # v target: min(SNR, gamma) / (SNR + 1)
        else:
            weight = torch.clamp(snr, max=objective.snr_gamma) / snr  # epsilon target: min(SNR, gamma) / SNR
        per_sample = per_sample * weight
    return per_sample


def flow_sigma(objective: Objective, scheduler, shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """One sample's sigma (1,) in (0, 1], drawn from generator `g`."""
    n = scheduler.config.num_train_timesteps
    if objective.timestep_sampling == "sigma":  # diffusers: a density over the scheduler's (shifted) sigmas
        from diffusers.training_utils import compute_density_for_timestep_sampling

        u = compute_density_for_timestep_sampling(
            objective.weighting_scheme, 1, objective.logit_mean, objective.logit_std, objective.mode_scale, generator=g
        )
        return scheduler.sigmas[(u * n).long().clamp(0, n - 1)].float()
    if objective.timestep_sampling == "uniform":
        return torch.rand(1, generator=g)
    t = torch.sigmoid(objective.sigmoid_scale * torch.randn(1, generator=g))
    if objective.timestep_sampling == "shift":  # kohya: sigma' = s sigma / (1 + (s - 1) sigma)
        shift = objective.discrete_flow_shift or scheduler.config.get("shift", 1.0)
        return t * shift / (1 + (shift - 1) * t)
    if objective.timestep_sampling == "flux_shift":  # Flux's resolution-dependent shift (FluxPipeline's mu)
        seq = shape[-1] * shape[-2] / 4
        cfg = scheduler.config
        slope = (cfg.get("max_shift", 1.15) - cfg.get("base_shift", 0.5)) / (
            cfg.get("max_image_seq_len", 4096) - cfg.get("base_image_seq_len", 256)
        )
        mu = cfg.get("base_shift", 0.5) + slope * (seq - cfg.get("base_image_seq_len", 256))
        return math.exp(mu) / (math.exp(mu) + (1 / t - 1))
    return t  # sigmoid


def flow_loss(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler,
    latents: torch.Tensor,
    seeds: torch.Tensor,
    objective: Objective,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample rectified-flow losses (B,) of latents (B, C, h, w); `predict(noisy, timesteps)` calls the
    denoiser with timesteps sigma x num_train_timesteps; `mask` (B, 1, h, w) weighs each element."""
    noises, sigmas = [], []
    for seed in seeds.tolist():
        g = torch.Generator().manual_seed(int(seed))
        noises.append(torch.randn(tuple(latents.shape[1:]), generator=g))
        sigmas.append(flow_sigma(objective, scheduler, tuple(latents.shape), g))
    noise = torch.stack(noises).to(latents)
    sigma = torch.cat(sigmas).to(latents.device)  # (B,)
    s = sigma.view(-1, 1, 1, 1).to(latents.dtype)
    noisy = (1.0 - s) * latents + s * noise  # x_t
    pred = predict(noisy, sigma * scheduler.config.num_train_timesteps)
    if objective.precondition_outputs:  # the velocity mapped back to x_0: x_t - sigma v
        pred, target = pred * (-s) + noisy, latents
    else:
        target = noise - latents
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    weight = compute_loss_weighting_for_sd3(objective.weighting_scheme, sigma.view(-1, 1, 1, 1)).float()
    return masked_mean(weight * (pred.float() - target.float()) ** 2, mask)


def masked_mean(loss: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-sample mean (B,) of element losses (B, C, h, w), each weighted by `mask` (B, 1, h, w) when given."""
    return (loss if mask is None else loss * mask).mean(dim=(1, 2, 3))


# The loss of each family's `objective`.
LOSSES = {"ddpm": diffusion_loss, "flow": flow_loss}


def batch_loss(family, models: dict, batch: dict, objective: Objective, dtype: torch.dtype) -> torch.Tensor:
    """The weighted mean loss of one batch: latents from cached posteriors (or the VAE), text conditioning from
    the cache (or the encoders, trained ones taken from `models`), then the family's objective."""
    seeds = batch["noise_seed"].cpu()
    if "latents" in batch:
        posterior = batch["latents"]
    else:
        posterior = family.vae.encode(batch["pixels"].to(family.vae.dtype)).latent_dist.parameters
    latents = family.latents(posterior.float(), seeds).to(dtype)
    if "cond" in batch:
        cond = batch["cond"]
    else:
        cond = family.encode_text(batch["ids"], {**family.text_encoders(), **models})
    denoiser = models.get(family.denoiser_name, family.denoiser)

    def predict(noisy: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return family.predict(denoiser, noisy, timesteps, cond, batch)

    mask = batch.get("mask")
    if mask is not None:  # pixel-sized (uncached) or already latent-sized (cached): area-averaged to the latents
        mask = F.adaptive_avg_pool2d(mask.float(), tuple(latents.shape[-2:])).to(latents.device)
    per_sample = LOSSES[family.objective](predict, family.noise_scheduler, latents, seeds, objective, mask)
    return (per_sample * batch["weight"].to(per_sample)).mean()
