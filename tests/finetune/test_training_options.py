"""Training options on tiny local models: family detection, buckets, captions, adapters, DreamBooth, objective
options and the failure modes users hit."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from PIL import Image
from safetensors.torch import load_file

from difftune.core.config import compose, from_values
from difftune.core.errors import UserError
from difftune.finetune import objective as objective_module
from difftune.finetune.buckets import BucketBatchSampler, assign_bucket, make_buckets, resize_to_bucket
from difftune.finetune.config import LoraTrainConfig, TrainConfig
from difftune.finetune.data import read_images, shuffle_tags
from difftune.finetune.loop import train
from difftune.finetune.objective import Objective, diffusion_loss, timestep_bias_weights
from difftune.finetune.tasks import LORA
from difftune.pipelines.families import detect, read_model_index
from difftune.toyworld.tiny import save_tiny_pipeline


def config(model, data, out, **kw) -> TrainConfig:
    base = dict(
        pretrained_model_name_or_path=str(model), train_data_dir=str(data), output_dir=str(out), resolution=64,
        center_crop=True, train_batch_size=2, max_train_steps=2, checkpointing_steps=1000, learning_rate=1e-2,
        report_to="none", seed=0,
    )  # fmt: skip
    base.update(kw)
    return from_values(LoraTrainConfig, base)


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("sdxl") / "m", size="test", family="sdxl")


@pytest.fixture(scope="module")
def tiny_sd2(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("sd2") / "m", size="test", family="sd2")


@pytest.fixture
def mixed_shapes(tmp_path):
    """Six captioned images: three wide (4:1), three tall (1:4)."""
    folder = tmp_path / "mixed"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, size in enumerate([(128, 32)] * 3 + [(32, 128)] * 3):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(f"tag{i}, red, circle")
    return folder


def load(model, **options):
    model = str(model)
    return detect(model).load(model, read_model_index(model), options=options)


def test_family_detection_and_prediction_type(tiny_sd1, tiny_sd2, tiny_sdxl):
    assert load(tiny_sd1).name == "sd1"
    sd2 = load(tiny_sd2)
    assert sd2.name == "sd2" and sd2.noise_scheduler.config.prediction_type == "v_prediction"
    assert load(tiny_sd2, prediction_type="epsilon").noise_scheduler.config.prediction_type == "epsilon"
    xl = load(tiny_sdxl)
    assert xl.name == "sdxl" and set(xl.text_encoders()) == {"text_encoder", "text_encoder_2"}
    zero = load(tiny_sd1, prediction_type="v_prediction", rescale_betas_zero_snr=True).noise_scheduler
    assert zero.alphas_cumprod[-1] < 1e-6


def test_sdxl_lora_with_buckets_trains_and_loads(tiny_sdxl, mixed_shapes, tmp_path):
    cfg = config(tiny_sdxl, mixed_shapes, tmp_path / "out", enable_bucket=True, min_bucket_reso=32,
                 max_bucket_reso=128, bucket_reso_steps=32, train_batch_size=3, max_train_steps=3,
                 train_text_encoder=True)  # fmt: skip
    result = train(cfg, LORA)
    assert result.global_step == 3 and all(np.isfinite(result.losses))
    keys = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors").keys()
    assert any(k.startswith("unet.") for k in keys) and any(k.startswith("text_encoder_2.") for k in keys)
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    kwargs = dict(num_inference_steps=2, height=64, width=64, output_type="np")
    base = pipe("red", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(tmp_path / "out")
    assert np.abs(pipe("red", generator=torch.Generator().manual_seed(0), **kwargs).images - base).max() > 1e-4


def test_v_prediction_target_is_the_velocity(tiny_sd2, shapes_dir, tmp_path):
    """A denoiser that outputs exactly v = sqrt(a) eps - sqrt(1 - a) x0 has zero loss; one that outputs eps does not."""
    scheduler = DDPMScheduler(prediction_type="v_prediction")
    latents, seeds = torch.randn(4, 4, 8, 8), torch.arange(4)
    noise, _, timesteps = objective_module.draw_noise(seeds, (4, 8, 8), 1000, 0.0, 0.0)
    a = scheduler.alphas_cumprod[timesteps].view(-1, 1, 1, 1)
    velocity = a.sqrt() * noise - (1 - a).sqrt() * latents  # Salimans & Ho 2022, by hand
    exact = diffusion_loss(lambda x, t: velocity, scheduler, latents, seeds, Objective())
    assert exact.max().item() < 1e-10
    assert diffusion_loss(lambda x, t: noise, scheduler, latents, seeds, Objective()).min().item() > 1e-3
    result = train(config(tiny_sd2, shapes_dir, tmp_path, snr_gamma=5.0, noise_offset=0.05), LORA)
    assert result.global_step == 2 and all(np.isfinite(result.losses))


def test_buckets_are_valid_and_nearest():
    buckets = make_buckets(512, 256, 1024, 64)
    assert all(w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 for w, h in buckets)
    assert (512, 512) in buckets
    wide = assign_bucket((1600, 900), buckets, 512, 64, False)
    assert wide[0] > wide[1] and abs(wide[0] / wide[1] - 16 / 9) < 0.2
    assert assign_bucket((100, 60), buckets, 512, 64, True) == (64, 64)  # never enlarged to a 512 bucket


def test_resize_to_bucket_reports_crop_origin():
    image, (top, left) = resize_to_bucket(Image.new("RGB", (200, 100)), (64, 64), None)
    assert image.size == (64, 64) and top == 0 and left == (128 - 64) // 2


def test_bucket_sampler_batches_one_bucket_and_covers_every_index():
    buckets = [(64, 32)] * 5 + [(32, 64)] * 4
    sampler = BucketBatchSampler(buckets, batch_size=2, seed=1)
    for epoch in (0, 1):
        sampler.start_epoch(epoch)
        batches = list(sampler)
        assert all(len({buckets[i] for i in b}) == 1 for b in batches)
        assert sorted(i for b in batches for i in b) == list(range(9))
    sampler.start_epoch(0)
    again = list(sampler)
    sampler.start_epoch(1)
    assert again != list(sampler)


def test_batch_larger_than_every_bucket_stops_before_loading(mixed_shapes, tmp_path):
    cfg = config(tmp_path / "no-model-needed", mixed_shapes, tmp_path, enable_bucket=True, min_bucket_reso=32,
                 max_bucket_reso=128, bucket_reso_steps=32, train_batch_size=4)  # fmt: skip
    with pytest.raises(UserError, match="--train_batch_size 4 is larger than every bucket"):
        read_images(cfg.data, cfg.dreambooth, batch_size=cfg.training.train_batch_size)


def test_shuffle_caption_keeps_leading_tokens():
    rng = np.random.default_rng(0)
    outs = {shuffle_tags("sks, dog, grass, sun, sky, tree", 2, rng) for _ in range(20)}
    assert len(outs) > 1 and all(o.startswith("sks, dog, ") for o in outs)
    assert all(sorted(o.split(", ")) == sorted("sks, dog, grass, sun, sky, tree".split(", ")) for o in outs)


@pytest.mark.parametrize("adapter", ["dora", "loha", "lokr"])
def test_other_adapters_train_save_and_load(tiny_sd1, shapes_dir, tmp_path, adapter):
    """Each adapter trains, and what it saved loads back onto the base and changes its output."""
    from diffusers import StableDiffusionPipeline

    result = train(config(tiny_sd1, shapes_dir, tmp_path, adapter=adapter, rank=2, repeats=2), LORA)
    assert result.global_step == 2
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None)
    kwargs = dict(num_inference_steps=2, height=64, width=64, output_type="np")
    base = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    if adapter == "dora":
        pipe.load_lora_weights(tmp_path)
    else:  # peft's own format: no diffusers LoRA format exists for LoHa/LoKr
        from peft import PeftConfig, inject_adapter_in_model, set_peft_model_state_dict
        from safetensors.torch import load_file as load

        peft_config = PeftConfig.from_pretrained(tmp_path / "unet")
        inject_adapter_in_model(peft_config, pipe.unet, "default")
        set_peft_model_state_dict(pipe.unet, load(tmp_path / "unet" / "adapter_model.safetensors"))
    adapted = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(adapted - base).max() > 1e-4


def test_dreambooth_generates_missing_class_images(tiny_sd1, shapes_dir, tmp_path):
    class_dir = tmp_path / "class"
    cfg = config(tiny_sd1, shapes_dir, tmp_path / "out", instance_prompt="a sks shape", class_prompt="a shape",
                 class_data_dir=str(class_dir), with_prior_preservation=True, num_class_images=2,
                 prior_loss_weight=0.5)  # fmt: skip
    result = train(cfg, LORA)
    assert result.global_step == 2 and len(list(class_dir.glob("*.png"))) == 2
    assert set(read_images(cfg.data, cfg.dreambooth).captions) == {"a sks shape"}  # the instance prompt captions all


def test_timestep_bias_weights():
    cfg = compose(
        LoraTrainConfig, dict(timestep_bias_strategy="later", timestep_bias_multiplier=3.0, timestep_bias_portion=0.25)
    )
    w = timestep_bias_weights(cfg.objective, 1000)
    assert w.sum().item() == pytest.approx(1.0) and w[-1] == pytest.approx(3 * w[0])
    assert timestep_bias_weights(compose(LoraTrainConfig, {}).objective, 1000) is None


def test_min_snr_weight_for_v_prediction_is_bounded():
    scheduler = DDPMScheduler(prediction_type="v_prediction")

    latents, seeds = torch.randn(8, 4, 4, 4), torch.arange(8)
    plain = diffusion_loss(lambda x, t: torch.zeros_like(x), scheduler, latents, seeds, Objective())
    weighted = diffusion_loss(lambda x, t: torch.zeros_like(x), scheduler, latents, seeds, Objective(snr_gamma=1.0))
    assert (weighted <= plain + 1e-6).all() and (weighted < plain).any()


def test_non_finite_loss_stops_naming_the_step(tiny_sd1, shapes_dir, tmp_path, monkeypatch):
    real = objective_module.diffusion_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] >= 3 else loss

    monkeypatch.setitem(objective_module.LOSSES, "ddpm", flaky)
    with pytest.raises(UserError, match=r"loss became nan at step 3.*checkpoint-2"):
        train(config(tiny_sd1, shapes_dir, tmp_path, max_train_steps=5, checkpointing_steps=2), LORA)
    assert (tmp_path / "checkpoint-2").exists() and not (tmp_path / "checkpoint-3").exists()


def test_prior_preservation_needs_class_images_or_a_prompt(tiny_sd1, shapes_dir, tmp_path):
    with pytest.raises(UserError, match="needs --class_data_dir"):
        config(tiny_sd1, shapes_dir, tmp_path, with_prior_preservation=True)
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(UserError, match="has no captions: give --class_prompt"):
        train(config(tiny_sd1, shapes_dir, tmp_path, with_prior_preservation=True, class_data_dir=str(bare)), LORA)


def test_captioned_class_dir_is_a_regularisation_set(tiny_sd1, shapes_dir, tmp_path):
    from difftune.toyworld import shapes

    reg = tmp_path / "reg"
    shapes.write_dataset(reg, ("green",), ("square",), per_class=3, seed=1)
    cfg = config(tiny_sd1, shapes_dir, tmp_path / "out", with_prior_preservation=True, class_data_dir=str(reg),
                 prior_loss_weight=0.5)  # fmt: skip
    from difftune.finetune.dreambooth import ensure_class_images

    class_records = ensure_class_images(cfg, accelerator=None)
    data = read_images(cfg.data, cfg.dreambooth, class_records)
    assert data.is_prior.count(True) == 3 and data.captions[-1] == "a green square"
    assert train(cfg, LORA).global_step == 2
