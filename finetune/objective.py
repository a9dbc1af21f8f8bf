"""The denoising objective: noise and timesteps per sample, epsilon or v targets, and their weighting.

Options follow the literature users know: min-SNR-gamma weighting (Hang et al. 2023, via diffusers'
`compute_snr`), noise offset (Guttenberg 2023), input perturbation (Ning et al. 2023), timestep bias (diffusers'
SDXL script) and zero terminal SNR (Lin et al. 2024, through the scheduler's `rescale_betas_zero_snr`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr


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


def diffusion_loss(
    unet,
    scheduler: DDPMScheduler,
    latents: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    seeds: torch.Tensor,
    noise_offset: float = 0.0,
    input_perturbation: float = 0.0,
    snr_gamma: float | None = None,
    unet_kwargs: dict | None = None,
    reduce: bool = True,
    timestep_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The training loss of one batch of latents (B, C, h, w); per-sample losses (B,) when not `reduce`."""
    noise, noise_in, timesteps = draw_noise(
        seeds, tuple(latents.shape[1:]), scheduler.config.num_train_timesteps, noise_offset, input_perturbation,
        timestep_weights,
    )  # fmt: skip
    noise, noise_in, timesteps = noise.to(latents), noise_in.to(latents), timesteps.to(latents.device)
    noisy = scheduler.add_noise(latents, noise_in, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    elif scheduler.config.prediction_type == "v_prediction":
        target = scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise ValueError(f"unsupported prediction_type {scheduler.config.prediction_type!r}")
    pred = unet(noisy, timesteps, encoder_hidden_states, return_dict=False, **(unet_kwargs or {}))[0]
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if snr_gamma is not None:
        snr = compute_snr(scheduler, timesteps)
        weight = torch.clamp(snr, max=snr_gamma) / snr  # epsilon target: min(SNR, gamma) / SNR
        if scheduler.config.prediction_type == "v_prediction":
            weight = torch.clamp(snr, max=snr_gamma) / (snr + 1)  # v target: min(SNR, gamma) / (SNR + 1)
        per_sample = per_sample * weight
    return per_sample.mean() if reduce else per_sample
