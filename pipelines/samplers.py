"""Samplers by name: each is a diffusers scheduler built from the pipeline's own scheduler config.

Building from the pipeline's config keeps what the model was trained with (beta schedule, number of training
timesteps, `prediction_type` such as SD 2.x's v-prediction, `steps_offset`); the name only chooses the solver.
The names follow what users know from A1111/ComfyUI: "Euler a" is `EulerAncestralDiscreteScheduler`, "DPM++ 2M
Karras" is `DPMSolverMultistepScheduler(use_karras_sigmas=True)`, "DPM++ SDE" is its `sde-dpmsolver++`
algorithm (the multistep SDE variant; diffusers' `DPMSolverSDEScheduler` needs `torchsde`, which we do not ship).
"""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from core.errors import UserError

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
}

# Samplers that draw fresh noise at every step: their output depends on the generator beyond the initial latents.
STOCHASTIC: frozenset[str] = frozenset({"ddpm", "euler-a", "dpmpp-sde"})


def sampler_names() -> list[str]:
    return list(SAMPLERS)


def make_scheduler(name: str, base_config: dict[str, Any]) -> SchedulerMixin:
    """The scheduler called `name`, configured from `base_config` (a pipeline's `scheduler.config`)."""
    if name not in SAMPLERS:
        raise UserError(f"unknown sampler {name!r}; choose one of: {', '.join(SAMPLERS)}")
    cls, overrides = SAMPLERS[name]
    if "clip_sample" not in base_config and cls in (DDIMScheduler, DDPMScheduler):
        # DDIM/DDPM default to clipping x0 to [-1, 1], a pixel-space default: on latents it wrecks the samples
        # (measured on the embedded base: DDIM-50 colour accuracy 0.25). SD's own scheduler configs say
        # clip_sample=false; a config that does not mention it (PNDM's, which has no such option) gets that too.
        overrides = {**overrides, "clip_sample": False}
    # from_config ignores keys the target class does not take (e.g. PNDM's skip_prk_steps for DDIM).
    return cls.from_config(base_config, **overrides)


def set_sampler(pipe: Any, name: str) -> None:
    """Swaps `pipe.scheduler` for the named sampler, keeping the pipeline's training-time schedule.

    The config the pipeline was loaded with is kept on first use, so that switching twice does not carry one
    sampler's options into the next (e.g. Karras sigmas from `dpmpp-2m-karras` into `euler`)."""
    if not hasattr(pipe, "base_scheduler_config"):
        pipe.base_scheduler_config = dict(pipe.scheduler.config)
    pipe.scheduler = make_scheduler(name, pipe.base_scheduler_config)
