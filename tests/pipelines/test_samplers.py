"""Every sampler name builds its diffusers scheduler from the pipeline's config and runs on a tiny pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.errors import UserError
from pipelines.samplers import SAMPLERS, make_scheduler, sampler_names, set_sampler
from toyworld.tiny import build_pipeline, sd_scheduler

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


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    pipe = build_pipeline("test", "sd1", tokenizer_dir=tmp_path_factory.mktemp("tok"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_issue_names_are_all_there():
    assert sampler_names() == list(EXPECTED_CLASSES)


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


@pytest.mark.parametrize("name", list(SAMPLERS))
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
