"""Every sampler name builds its diffusers scheduler from the pipeline's config and runs on a tiny pipeline."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler

from difftune.core.errors import UserError
from difftune.pipelines import samplers
from difftune.pipelines.samplers import SAMPLERS, check_steps, make_scheduler, sampler_names, set_sampler
from difftune.toyworld.tiny import build_pipeline
from difftune.toyworld.tiny_parts import sd_scheduler

EMBEDDED_BASE = Path(__file__).resolve().parents[2] / "pipelines" / "tiny_shapes"

EXPECTED_CLASSES = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-a": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "dpmpp-2m": "DPMSolverMultistepScheduler",
    "dpmpp-2m-karras": "DPMSolverMultistepScheduler",
    "dpmpp-sde": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
FLOW_CLASSES = {
    "flow-euler": "FlowMatchEulerDiscreteScheduler",
    "flow-heun": "FlowMatchHeunDiscreteScheduler",
    "flow-dpmpp-2m": "DPMSolverMultistepScheduler",
    "flow-unipc": "UniPCMultistepScheduler",
}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    pipe = build_pipeline("test", "sd1", tokenizer_dir=tmp_path_factory.mktemp("tok"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_issue_names_are_all_there():
    assert sampler_names() == [*EXPECTED_CLASSES, *FLOW_CLASSES]
    assert sampler_names("ddpm") == list(EXPECTED_CLASSES) and sampler_names("flow") == list(FLOW_CLASSES)


@pytest.mark.parametrize("name", list(EXPECTED_CLASSES))
def test_every_sampler_runs_two_steps(pipe, name):
    set_sampler(pipe, name)
    assert type(pipe.scheduler).__name__ == EXPECTED_CLASSES[name]
    out = pipe(
        "a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert out.shape == (1, 32, 32, 3)
    assert np.isfinite(out).all()


def test_dpm_variants_differ_in_the_options_that_name_them():
    base = dict(sd_scheduler().config)
    assert make_scheduler("dpmpp-2m", base).config.algorithm_type == "dpmsolver++"
    assert make_scheduler("dpmpp-2m", base).config.use_karras_sigmas is False
    assert make_scheduler("dpmpp-2m-karras", base).config.use_karras_sigmas is True
    assert make_scheduler("dpmpp-sde", base).config.algorithm_type == "sde-dpmsolver++"


@pytest.mark.parametrize("name", sampler_names("ddpm"))  # the flow samplers run in test_generate_flow.py
def test_the_training_schedule_is_kept(name):
    # SD 2.x's v-prediction and the SD betas must survive the swap, or the model is sampled wrongly.
    scheduler = make_scheduler(name, dict(sd_scheduler("v_prediction").config))
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.beta_schedule == "scaled_linear"
    assert scheduler.config.beta_end == pytest.approx(0.012)


def test_latent_samplers_do_not_clip_x0_unless_the_config_says_so():
    # PNDM's config has no clip_sample; DDIM's and DDPM's own default (True) would clip latents to [-1, 1].
    assert make_scheduler("ddim", dict(sd_scheduler().config)).config.clip_sample is False
    assert make_scheduler("ddpm", dict(sd_scheduler().config)).config.clip_sample is False
    assert make_scheduler("ddim", {**sd_scheduler().config, "clip_sample": True}).config.clip_sample is True


def test_plain_diffusers_swap_on_the_embedded_base_does_not_clip_latents():
    # What users write from diffusers' docs: DDIMScheduler.from_config(pipe.scheduler.config), no help from us.
    shipped = PNDMScheduler.from_pretrained(EMBEDDED_BASE, subfolder="scheduler")
    ddim = DDIMScheduler.from_config(shipped.config)
    assert ddim.config.clip_sample is False
    ddim.set_timesteps(10)
    t = ddim.timesteps[0]
    latent = torch.full((1, 4, 2, 2), 3.0)  # latents leave [-1, 1]; with eps = 0, x0 = latent / sqrt(alpha_bar_t)
    prev = ddim.step(torch.zeros_like(latent), t, latent).prev_sample
    x0 = latent / ddim.alphas_cumprod[t].sqrt()
    alpha_prev = ddim.alphas_cumprod[t - ddim.config.num_train_timesteps // 10]
    assert torch.allclose(prev, alpha_prev.sqrt() * x0)  # x0 kept at ~3.3, not clipped to 1
    assert prev.min() > alpha_prev.sqrt() * 1.5


def test_a_config_without_clip_sample_is_sampled_unclipped_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(samplers, "_warned_clip_sample", False)
    base = dict(sd_scheduler().config)
    assert "clip_sample" not in base
    with caplog.at_level(logging.WARNING, logger="difftune.pipelines.samplers"):
        for name in ("ddim", "ddpm", "ddim"):
            assert make_scheduler(name, base).config.clip_sample is False
        make_scheduler("ddim", {**base, "clip_sample": False})
    warnings = [r.getMessage() for r in caplog.records if r.name == "difftune.pipelines.samplers"]
    assert len(warnings) == 1 and "clip_sample" in warnings[0] and "latents" in warnings[0]


@pytest.mark.parametrize(
    "name, steps, overrides, words",
    [
        ("pndm", 3, {"skip_prk_steps": False}, ["sampler pndm cannot run --steps 3", "broadcast", "use --steps 4"]),
        ("ddim", 1000, {}, ["sampler ddim cannot run --steps 1000", "use --steps 999"]),
        ("ddpm", 1001, {}, ["cannot be larger", "use --steps 999"]),
    ],
)
def test_step_counts_the_scheduler_cannot_run_say_what_to_use(name, steps, overrides, words):
    config = dict(sd_scheduler(**overrides).config)
    with pytest.raises(UserError) as err:
        check_steps(name, steps, config)
    assert all(w in str(err.value) for w in words), str(err.value)
    check_steps(name, int(str(err.value).rsplit(" ", 1)[1]), config)  # the advice runs


def test_step_check_accepts_what_runs_and_leaves_the_global_rng_alone():
    config = dict(sd_scheduler().config)
    state = torch.random.get_rng_state()
    for name in SAMPLERS:  # stochastic ones draw noise during the check
        check_steps(name, 3, config)
    check_steps("pndm", 3, dict(sd_scheduler().config))  # skip_prk_steps=True (SD's config): PLMS runs 3 steps
    assert torch.equal(state, torch.random.get_rng_state())


def test_switching_samplers_does_not_carry_options_over(pipe):
    set_sampler(pipe, "dpmpp-2m-karras")
    set_sampler(pipe, "euler")
    assert pipe.scheduler.config.use_karras_sigmas is False
    set_sampler(pipe, "pndm")  # back to the class the pipeline came with, for the other tests


def test_unknown_sampler_lists_the_valid_names():
    with pytest.raises(UserError) as err:
        make_scheduler("dpm++", dict(sd_scheduler().config))
    message = str(err.value)
    assert "dpm++" in message and "\n" not in message
    assert all(name in message for name in SAMPLERS)
