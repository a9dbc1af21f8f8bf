"""The denoising objective: noise and timesteps per sample, epsilon or v targets, and their weighting.

Options follow the literature users know: min-SNR-gamma weighting (Hang et al. 2023, via diffusers'
`compute_snr`), noise offset (Guttenberg 2023), input perturbation (Ning et al. 2023), timestep bias (diffusers'
SDXL script) and zero terminal SNR (Lin et al. 2024, through the scheduler's `rescale_betas_zero_snr`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from core.errors import UserError


def timestep_bias_weights(cfg, num_timesteps: int) -> torch.Tensor | None:
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

    @classmethod
    def from_config(cls, cfg, scheduler) -> Objective:
        weights = timestep_bias_weights(cfg, scheduler.config.num_train_timesteps)
        return cls(cfg.noise_offset, cfg.input_perturbation, cfg.snr_gamma, weights)


def diffusion_loss(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    seeds: torch.Tensor,
    objective: Objective,
) -> torch.Tensor:
    """Per-sample losses (B,) of latents (B, C, h, w) under a DDPM schedule; `predict(noisy, timesteps)` calls the
    denoiser. The target is epsilon or v, as the scheduler's `prediction_type` says."""
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
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if objective.snr_gamma is not None:
        snr = compute_snr(scheduler, timesteps)
        if scheduler.config.prediction_type == "v_prediction":
            weight = torch.clamp(snr, max=objective.snr_gamma) / (snr + 1)  # v target: min(SNR, gamma) / (SNR + 1)
        else:
            weight = torch.clamp(snr, max=objective.snr_gamma) / snr  # epsilon target: min(SNR, gamma) / SNR
        per_sample = per_sample * weight
    return per_sample


# The loss of each family's `objective` ("flow" joins with the rectified-flow families).
LOSSES = {"ddpm": diffusion_loss}


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

    per_sample = LOSSES[family.objective](predict, family.noise_scheduler, latents, seeds, objective)
    return (per_sample * batch["weight"].to(per_sample)).mean()
