"""Samplers by name: each is a diffusers scheduler built from the pipeline's own scheduler config.

Building from the pipeline's config keeps what the model was trained with (beta schedule, number of training
timesteps, `prediction_type` such as SD 2.x's v-prediction, `steps_offset`); the name only chooses the solver.
The names follow what users know from A1111/ComfyUI: "Euler a" is `EulerAncestralDiscreteScheduler`, "DPM++ 2M
Karras" is `DPMSolverMultistepScheduler(use_karras_sigmas=True)`, "DPM++ SDE" is its `sde-dpmsolver++`
algorithm (the multistep SDE variant; diffusers' `DPMSolverSDEScheduler` needs `torchsde`, which we do not ship).

Whether a sampler can run a number of steps depends on the scheduler and its config (PNDM without
`skip_prk_steps` needs 4 steps for its Runge-Kutta warm-up; leading spacing with `steps_offset=1` cannot take
every training timestep): `check_steps` runs the real scheduler on a 1-pixel latent before any model loads.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from difftune.core.errors import UserError

logger = logging.getLogger(__name__)

FLOW_SIGMAS = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
# name -> (scheduler class, config overrides on top of the pipeline's scheduler config)
SAMPLERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpmpp-2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp-2m-karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "dpmpp-sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {}),
    # Flow-matching models (SD 3/3.5, Flux, Flux.2, Qwen-Image, Z-Image, Chroma): the flow's own Euler and Heun, and
    # DPM-Solver++/UniPC on flow sigmas.
    "flow-euler": (FlowMatchEulerDiscreteScheduler, {}),
    "flow-heun": (FlowMatchHeunDiscreteScheduler, {}),
    "flow-dpmpp-2m": (
        DPMSolverMultistepScheduler,
        {**FLOW_SIGMAS, "algorithm_type": "dpmsolver++", "solver_order": 2},
    ),
    "flow-unipc": (UniPCMultistepScheduler, FLOW_SIGMAS),
}
FLOW_SAMPLERS: frozenset[str] = frozenset(name for name in SAMPLERS if name.startswith("flow-"))

# Samplers that draw fresh noise at every step: their output depends on the generator beyond the initial latents.
STOCHASTIC: frozenset[str] = frozenset({"ddpm", "euler-a", "dpmpp-sde"})


def sampler_names(kind: str | None = None) -> list[str]:
    """Every sampler, or those of one kind: "ddpm" (epsilon/v models) or "flow" (flow-matching models)."""
    return [n for n in SAMPLERS if kind is None or (n in FLOW_SAMPLERS) == (kind == "flow")]


def fitting_samplers(family) -> list[str]:
    """The samplers that fit the family: the flow ones for flow models, the others for UNet models."""
    flow = family.objective == "flow"
    return [
        n
        for n in SAMPLERS
        if (n in FLOW_SAMPLERS) == flow and takes_sigmas(n, family) and n not in family.unfit_samplers
    ]


def check_sampler(name: str, family) -> None:
    """A `UserError` when sampler `name` does not fit the family: DDPM samplers on a flow model or the reverse, or
    a scheduler that cannot take the custom sigmas the family's pipeline passes (FluxPipeline does)."""
    if (name in FLOW_SAMPLERS) != (family.objective == "flow"):
        fitting = fitting_samplers(family)
        kind = "flow-matching" if name in FLOW_SAMPLERS else "DDPM (epsilon/v)"
        raise UserError(
            f"sampler {name} is for {kind} models; {family.name} models ({family.pipeline_class_name}) sample with: "
            f"{', '.join(fitting)}"
        )
    if name in family.unfit_samplers:
        raise UserError(
            f"sampler {name} does not run with {family.pipeline_class_name}: {family.unfit_samplers[name]}; use one "
            f"of: {', '.join(fitting_samplers(family))}"
        )
    if not takes_sigmas(name, family):
        fitting = [n for n in FLOW_SAMPLERS if takes_sigmas(n, family)]
        raise UserError(
            f"sampler {name}: {family.pipeline_class_name} passes its own sigmas, which {SAMPLERS[name][0].__name__} "
            f"cannot take; use one of: {', '.join(sorted(fitting))}"
        )


def takes_sigmas(name: str, family) -> bool:
    """Whether the sampler's scheduler accepts what the family's pipeline hands `set_timesteps` (Flux2Pipeline
    hands none to a scheduler on flow sigmas: it sets its own)."""
    cls, overrides = SAMPLERS[name]
    if not family.passes_sigmas or (family.flow_sigmas_set_own and overrides.get("use_flow_sigmas")):
        return True
    return "sigmas" in inspect.signature(cls.set_timesteps).parameters


def make_scheduler(name: str, base_config: dict[str, Any]) -> SchedulerMixin:
    """The scheduler called `name`, configured from `base_config` (a pipeline's `scheduler.config`)."""
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    cls, overrides = SAMPLERS[name]
    if name in FLOW_SAMPLERS and "use_flow_sigmas" in overrides:  # the flow model's own shift, as flow_shift
        overrides = {**overrides, "flow_shift": base_config.get("shift", 1.0)}
    if "clip_sample" not in base_config and cls in (DDIMScheduler, DDPMScheduler):
        # DDIM/DDPM default to clipping x0 to [-1, 1], a pixel-space default: on latents it wrecks the samples
        # (measured on the embedded base: DDIM-50 colour accuracy 0.29 instead of 1.00). SD's own scheduler
        # configs, and the embedded base's, say clip_sample=false; other people's may not mention it.
        _warn_clip_sample_once()
        overrides = {**overrides, "clip_sample": False}
    # from_config ignores keys the target class does not take (e.g. PNDM's skip_prk_steps for DDIM).
    return cls.from_config(base_config, **overrides)


_warned_clip_sample = False


def _warn_clip_sample_once() -> None:
    global _warned_clip_sample
    if not _warned_clip_sample:
        _warned_clip_sample = True
        logger.warning(
            "the model's scheduler config does not set clip_sample; sampling with clip_sample=false, since DDIM's "
            "and DDPM's default (clip x0 to [-1, 1]) is meant for pixels and ruins latents. Add "
            '"clip_sample": false to its scheduler_config.json to silence this.'
        )


def check_steps(name: str, steps: int, base_config: dict[str, Any], flag: str = "--steps") -> None:
    """A `UserError` saying what to use if the sampler cannot run `steps` steps on this scheduler config.

    The scheduler is built and run for real (every step, on a zero 1x1x1x1 latent and a zero model output), so the
    rules are diffusers' own, whatever the config: this costs well under a second even at 1000 steps."""
    error = _dry_run(name, steps, base_config)
    if error is None:
        return
    nearest = sorted(range(max(1, steps - 8), steps + 9), key=lambda k: (abs(k - steps), k))
    ok = next((k for k in nearest if k != steps and _dry_run(name, k, base_config) is None), None)
    hint = f"the nearest step count it runs is {ok}: use {flag} {ok}" if ok else "choose another sampler"
    cls = SAMPLERS[name][0].__name__
    raise UserError(f"sampler {name} cannot run {flag} {steps} with this model's scheduler ({cls}: {error}); {hint}")


def _dry_run(name: str, steps: int, base_config: dict[str, Any]) -> str | None:
    """None if the sampler runs `steps` steps, else the first line of the scheduler's error."""
    scheduler = make_scheduler(name, base_config)
    with torch.random.fork_rng(devices=[]):  # stochastic samplers draw noise: keep the caller's global RNG as it was
        try:
            if scheduler.config.get("use_dynamic_shifting", False):
                scheduler.set_timesteps(steps, mu=1.0)  # Flux computes mu from the image size; any value tests steps
            else:
                scheduler.set_timesteps(steps)
            latent = torch.zeros(1, 1, 1, 1)  # (B, C, h, w)
            for t in scheduler.timesteps:
                scale = getattr(scheduler, "scale_model_input", None)  # flow schedulers have none
                model_input = scale(latent, t) if scale is not None else latent
                latent = scheduler.step(torch.zeros_like(model_input), t, latent).prev_sample
        except (ValueError, IndexError, RuntimeError, AssertionError, ZeroDivisionError) as err:
            lines = [line.strip() for line in str(err).splitlines() if line.strip()]
            return lines[0][:200] if lines else type(err).__name__
    return None


def set_sampler(pipe: Any, name: str) -> None:
    """Swaps `pipe.scheduler` for the named sampler, keeping the pipeline's training-time schedule.

    The config the pipeline was loaded with is kept on first use, so that switching twice does not carry one
    sampler's options into the next (e.g. Karras sigmas from `dpmpp-2m-karras` into `euler`)."""
    if not hasattr(pipe, "base_scheduler_config"):
        pipe.base_scheduler_config = dict(pipe.scheduler.config)
    pipe.scheduler = make_scheduler(name, pipe.base_scheduler_config)
