"""The flow-matching families (SD 3, SD 3.5, Flux) on tiny local pipelines: the rectified-flow objective against a
hand-computed example, LoRA training through `accelerate launch` and loading in plain diffusers, cache and resume
equivalence, an overfit test (a LoRA trained on one image brings samples to it), and the errors for settings that do not apply."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from PIL import Image
from safetensors.torch import load_file

from difftune.core.config import from_values
from difftune.core.errors import UserError
from difftune.finetune.config import LoraTrainConfig
from difftune.finetune.loop import train
from difftune.finetune.objective import Objective, flow_loss
from difftune.finetune.tasks import LORA
from difftune.toyworld.tiny import save_tiny_pipeline

REPO_ROOT = Path(__file__).resolve().parents[2]

FAMILIES = ["sd3", "sd35", "flux", "flux-schnell"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(scope="module")
def flow_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow")
    models = {f: save_tiny_pipeline(root / f, size="test", family=f) for f in FAMILIES}
    models["sd3-no-t5"] = save_tiny_pipeline(root / "sd3-no-t5", size="test", family="sd3", t5=False)
    return models


def config(model, data, out, **kw) -> LoraTrainConfig:
    base = dict(
        pretrained_model_name_or_path=str(model), train_data_dir=str(data), output_dir=str(out), resolution=32,
        center_crop=True, train_batch_size=2, max_train_steps=4, checkpointing_steps=2, learning_rate=1e-3,
        report_to="none", seed=1, max_sequence_length=16,
    )  # fmt: skip
    base.update(kw)
    return from_values(LoraTrainConfig, base)


def load_pipeline(folder):
    kwargs = {"text_encoder_3": None, "tokenizer_3": None} if "no-t5" in str(folder) else {}
    pipe = DiffusionPipeline.from_pretrained(folder, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, prompt="a red circle", size=32, steps=2) -> np.ndarray:
    return pipe(prompt, num_inference_steps=steps, height=size, width=size, output_type="np", max_sequence_length=16,
                generator=torch.Generator().manual_seed(0)).images  # fmt: skip


# ----------------------------------------------------------------------------------------------- the objective


def test_flow_target_and_weights_match_a_hand_computed_example():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    latents, seeds = torch.randn(3, 4, 4, 4), torch.tensor([5, 6, 7])
    noise, sigma = [], []
    for seed in (5, 6, 7):  # by hand: each sample's noise, then its logit-normal draw, from its own seed
        g = torch.Generator().manual_seed(seed)
        noise.append(torch.randn(4, 4, 4, generator=g))
        u = torch.sigmoid(torch.normal(0.0, 1.0, (1,), generator=g))
        sigma.append(scheduler.sigmas[int(u * 1000)])
    noise, sigma = torch.stack(noise), torch.stack(sigma).view(-1, 1, 1, 1)
    seen = {}

    def velocity(noisy, timesteps):  # the exact velocity eps - x0, read back from x_t = (1 - s) x0 + s eps
        seen["t"], seen["x_t"] = timesteps, noisy
        return noise - latents

    objective = Objective(weighting_scheme="logit_normal")
    assert flow_loss(velocity, scheduler, latents, seeds, objective).max() < 1e-10
    torch.testing.assert_close(seen["x_t"], (1 - sigma) * latents + sigma * noise)
    torch.testing.assert_close(seen["t"], sigma.flatten() * 1000)
    zero = flow_loss(lambda x, t: torch.zeros_like(x), scheduler, latents, seeds, objective)
    torch.testing.assert_close(zero, ((noise - latents) ** 2).mean(dim=(1, 2, 3)))
    # SD3's preconditioning: pred x (-sigma) + x_t against x0, which the exact velocity also meets
    preconditioned = Objective(weighting_scheme="logit_normal", precondition_outputs=True)
    assert flow_loss(velocity, scheduler, latents, seeds, preconditioned).max() < 1e-10


def test_cosmap_weights_and_kohya_shift_by_hand():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    latents, seeds = torch.randn(2, 4, 4, 4), torch.tensor([1, 2])
    sigmas, noises = [], []
    for seed in (1, 2):  # cosmap samples u uniformly and indexes the scheduler's sigmas
        g = torch.Generator().manual_seed(seed)
        noises.append(torch.randn(4, 4, 4, generator=g))
        sigmas.append(scheduler.sigmas[int(torch.rand(1, generator=g) * 1000)])
    s = torch.stack(sigmas)
    weight = 2 / (math.pi * (1 - 2 * s + 2 * s**2))  # Esser et al. 2024, eq. 20
    zero = flow_loss(lambda x, t: torch.zeros_like(x), scheduler, latents, seeds, Objective(weighting_scheme="cosmap"))
    torch.testing.assert_close(zero, weight.flatten() * ((torch.stack(noises) - latents) ** 2).mean(dim=(1, 2, 3)))
    seen = {}

    def record(noisy, timesteps):
        seen["t"] = timesteps
        return torch.zeros_like(noisy)

    flow_loss(record, scheduler, latents, seeds, Objective(timestep_sampling="shift", discrete_flow_shift=3.0))
    expected = []
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        torch.randn(4, 4, 4, generator=g)
        t = torch.sigmoid(torch.randn(1, generator=g))
        expected.append(3 * t / (1 + 2 * t) * 1000)  # kohya's discrete flow shift
    torch.testing.assert_close(seen["t"], torch.cat(expected))


# ----------------------------------------------------------------------------------------------- the families


def test_lora_under_accelerate_launch_loads_in_diffusers_and_changes_the_output(flow_models, shapes_dir, tmp_path):
    out = tmp_path / "flux-lora"
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    proc = subprocess.run(
        [*accelerate, "finetune/finetune_lora.py", "--pretrained_model_name_or_path", str(flow_models["flux"]),
         "--train_data_dir", str(shapes_dir), "--output_dir", str(out), "--resolution", "32", "--max_train_steps", "3",
         "--train_batch_size", "2", "--learning_rate", "1e-2", "--max_sequence_length", "16", "--report_to", "none",
         "--train_text_encoder", "--guidance_scale", "3.5"],
        cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    keys = load_file(out / "pytorch_lora_weights.safetensors").keys()
    assert any(k.startswith("transformer.") for k in keys) and any(k.startswith("text_encoder.") for k in keys)
    assert "flux" in (out / "README.md").read_text()
    pipe = load_pipeline(flow_models["flux"])
    base = sample(pipe)
    pipe.load_lora_weights(out)
    assert np.abs(sample(pipe) - base).max() > 1e-4


@pytest.mark.parametrize("family", ["sd3", "sd35", "flux-schnell", "sd3-no-t5"])
def test_lora_trains_and_loads(flow_models, shapes_dir, tmp_path, family):
    result = train(config(flow_models[family], shapes_dir, tmp_path, learning_rate=1e-2), LORA)
    assert result.global_step == 4 and all(np.isfinite(result.losses))
    pipe = load_pipeline(flow_models[family])
    base = sample(pipe)
    pipe.load_lora_weights(tmp_path)
    assert np.abs(sample(pipe) - base).max() > 1e-4


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_cached_and_uncached_text_embeddings_give_the_same_losses(flow_models, shapes_dir, tmp_path, family):
    cached = train(config(flow_models[family], shapes_dir, tmp_path / "a"), LORA)
    uncached = train(config(flow_models[family], shapes_dir, tmp_path / "b", cache_latents=False), LORA)
    assert cached.cached and not uncached.cached
    assert cached.losses == pytest.approx(uncached.losses, rel=1e-4)


@pytest.mark.parametrize("family", ["sd35", "flux"])
def test_resume_is_bit_exact(flow_models, shapes_dir, tmp_path, family):
    straight = train(config(flow_models[family], shapes_dir, tmp_path / "a", max_train_steps=4), LORA)
    train(config(flow_models[family], shapes_dir, tmp_path / "b", max_train_steps=2), LORA)
    resumed = train(config(flow_models[family], shapes_dir, tmp_path / "b", resume_from_checkpoint="latest"), LORA)
    assert resumed.losses == straight.losses[2:]
    a, b = (load_file(tmp_path / d / "checkpoint-4" / "model.safetensors") for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "family, settings, message",
    [
        (
            "sd3",
            {"snr_gamma": 5.0},
            "--snr_gamma does not apply to sd3 models .StableDiffusion3Pipeline, flow objective.",
        ),
        ("sd3", {"prediction_type": "v_prediction"}, "--prediction_type does not apply to sd3 models"),
        ("flux-schnell", {"guidance_scale": 3.5}, "has no guidance embeddings"),
        ("sd3", {"max_sequence_length": 10_000}, "beyond the T5 tokenizer's limit"),
        ("sd3", {"output_kohya_format": True}, "--output_kohya_format is not written for sd3 models"),
    ],
)
def test_settings_that_do_not_apply_are_one_line(flow_models, shapes_dir, tmp_path, family, settings, message):
    with pytest.raises(UserError, match=message):
        train(config(flow_models[family], shapes_dir, tmp_path, **settings), LORA)


def test_flow_settings_on_a_unet_model_are_refused(tiny_sd1, shapes_dir, tmp_path):
    with pytest.raises(UserError, match="--weighting_scheme does not apply to sd1 models"):
        train(config(tiny_sd1, shapes_dir, tmp_path, weighting_scheme="logit_normal", max_sequence_length=None), LORA)


# ----------------------------------------------------------------------------------------------- overfitting


def test_a_lora_overfit_on_one_image_brings_samples_to_it(tmp_path):
    """On the embedded flow base (an SD 3 transformer trained on the shapes world): 300 steps on one image pull the
    samples of its caption onto it. (The random tiny test transformers cannot fit an image through a LoRA at all,
    so they cannot show this.)"""
    from difftune.pipelines.loading import load_pipeline as load
    from difftune.toyworld import shapes

    data = tmp_path / "one"
    shapes.write_dataset(data, ("red",), ("square",), per_class=1, seed=0)
    image = np.asarray(Image.open(next(data.glob("*.png"))).convert("RGB"), np.float32) / 255
    base = REPO_ROOT / "pipelines" / "tiny_flow_shapes"
    cfg = config(base, data, tmp_path / "lora", resolution=64, train_batch_size=1, max_train_steps=300,
                 learning_rate=3e-3, rank=16, lora_alpha=16, checkpointing_steps=1000, max_sequence_length=256)  # fmt: skip
    train(cfg, LORA)
    pipe, _ = load(str(base))
    pipe.set_progress_bar_config(disable=True)

    def mse() -> float:
        images = [pipe("a red square", num_inference_steps=20, output_type="np", guidance_scale=1.0,
                       generator=torch.Generator().manual_seed(s)).images[0] for s in range(3)]  # fmt: skip
        return float(np.mean([(im - image) ** 2 for im in images]))

    before = mse()
    pipe.load_lora_weights(tmp_path / "lora")
    after = mse()
    assert after <= 0.5 * before, (before, after)
