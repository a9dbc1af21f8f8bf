"""Masked loss: masks found beside images or in a column, cropped and flipped with their image, cached
on the latent grid, and a zero region contributing no gradient, for both objectives."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from PIL import Image

from difftune.core.config import from_values
from difftune.core.errors import UserError
from difftune.finetune.buckets import resize_to_bucket
from difftune.finetune.config import LoraTrainConfig
from difftune.finetune.data import build_dataset, collate, read_images, sample_rng
from difftune.finetune.loop import load_models, train
from difftune.finetune.objective import Objective, batch_loss, diffusion_loss, flow_loss
from difftune.finetune.tasks import LORA
from difftune.toyworld.tiny_parts import sd_scheduler


def config(model, data, out, **kw) -> LoraTrainConfig:
    base = dict(
        pretrained_model_name_or_path=str(model), train_data_dir=str(data), output_dir=str(out), resolution=32,
        center_crop=True, train_batch_size=4, max_train_steps=2, learning_rate=1e-2, report_to="none", seed=3,
    )  # fmt: skip
    base.update(kw)
    return from_values(LoraTrainConfig, base)


def half_mask(size: tuple[int, int]) -> Image.Image:
    """Black (weight 0) on the left half, white (weight 1) on the right."""
    arr = np.full((size[1], size[0]), 255, np.uint8)
    arr[:, : size[0] // 2] = 0
    return Image.fromarray(arr, mode="L")


def masked_copy(shapes_dir, folder, make_mask=half_mask):
    shutil.copytree(shapes_dir, folder)
    for image in sorted(folder.glob("*.png")):
        make_mask(Image.open(image).size).save(image.with_name(f"{image.stem}_mask.png"))
    return folder


@pytest.mark.parametrize("loss", [diffusion_loss, flow_loss])
def test_a_zero_half_of_the_mask_gives_zero_gradient_from_that_half(loss):
    scheduler = sd_scheduler() if loss is diffusion_loss else __import__("diffusers").FlowMatchEulerDiscreteScheduler()
    latents = torch.randn(2, 4, 8, 8)
    pred = torch.randn(2, 4, 8, 8, requires_grad=True)  # what the denoiser would output
    mask = torch.ones(2, 1, 8, 8)
    mask[..., :4] = 0.0
    loss(lambda noisy, t: pred * 1.0, scheduler, latents, torch.arange(2), Objective(), mask).sum().backward()
    assert torch.all(pred.grad[..., :4] == 0) and torch.all(pred.grad[..., 4:] != 0)


def test_mask_files_are_masks_not_training_images(shapes_dir, tmp_path):
    data = masked_copy(shapes_dir, tmp_path / "d")
    images = read_images(config("m", data, tmp_path / "o").data)
    assert len(images.images) == 12 and not any(Path(r.name).stem.endswith("_mask") for r in images.records)
    assert all(m is not None and m.getpixel((0, 0)) == 0 and m.getpixel((63, 0)) == 255 for m in images.masks)


def test_a_mask_column_names_the_mask_and_a_wrong_size_is_one_line(shapes_dir, tmp_path):
    data = tmp_path / "d"
    shutil.copytree(shapes_dir, data)
    (data / "masks").mkdir()
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    half_mask((64, 64)).save(data / "masks" / "first.png")
    rows[0]["mask"] = "masks/first.png"
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    images = read_images(config("m", data, tmp_path / "o").data)
    assert images.masks[0] is not None and all(m is None for m in images.masks[1:])
    half_mask((32, 64)).save(data / "masks" / "first.png")
    with pytest.raises(UserError, match=r"first.png: mask is 32x64, its image .* is 64x64"):
        read_images(config("m", data, tmp_path / "o").data)


def red_channel_mask(folder):
    """Each image's mask is its own red channel, so any crop, resize or flip shows whether they stayed aligned."""
    for image in sorted(folder.glob("*.png")):
        if not image.stem.endswith("_mask"):
            Image.open(image).convert("RGB").getchannel("R").save(image.with_name(f"{image.stem}_mask.png"))


@pytest.fixture(scope="module")
def sd1_lora(tiny_sd1, shapes_dir, tmp_path_factory):
    cfg = config(tiny_sd1, shapes_dir, tmp_path_factory.mktemp("m"))
    return load_models(cfg, LORA, Accelerator(cpu=True))


@pytest.mark.parametrize("cache", [True, False])
def test_masks_crop_and_flip_with_their_image(tiny_sd1, shapes_dir, tmp_path, sd1_lora, cache):
    family, trainable, _ = sd1_lora
    data = tmp_path / "d"
    shutil.copytree(shapes_dir, data)
    # non-square images in buckets, so random crops move (uncached) or the centre crop is taken (cached)
    for image in sorted(data.glob("*.png")):
        Image.open(image).resize((96, 64)).save(image)
    red_channel_mask(data)
    cfg = config(tiny_sd1, data, tmp_path / "o", random_flip=True, enable_bucket=True, resolution=64,
                 min_bucket_reso=32, max_bucket_reso=128, bucket_reso_steps=32, center_crop=cache,
                 cache_latents=cache)  # fmt: skip
    images = read_images(cfg.data)
    dataset, cached = build_dataset(cfg, images, family, trainable.models)
    assert cached == cache
    flips = 0
    for index in range(len(dataset)):
        item = dataset[index]
        flipped = sample_rng(cfg.training.seed, 0, index).random() < 0.5  # the dataset's own flip draw
        flips += flipped
        if cache:  # the mask (latent grid) is the area average of the red channel of the centre crop, flipped along
            ex = dataset.examples[index]
            assert torch.equal(item["latents"], ex.latents_flipped if flipped else ex.latents)
            assert torch.equal(item["mask"], ex.mask_flipped if flipped else ex.mask)
            assert torch.equal(ex.mask_flipped, ex.mask.flip(-1)) and ex.mask.shape[-2:] == ex.latents.shape[-2:]
            crop = resize_to_bucket(images.images[index], ex.bucket, None)[0]
            red = torch.from_numpy(np.asarray(crop.getchannel("R"), dtype=np.float32) / 255)[None, None]
            assert (F.adaptive_avg_pool2d(red, ex.mask.shape[-2:])[0] - ex.mask).abs().max() < 0.02
        else:  # pixel resolution: the mask is the red channel of exactly this (cropped, maybe flipped) image
            red = (item["pixels"][0] + 1) / 2
            assert item["mask"].shape == (1, *red.shape)
            assert (item["mask"][0] - red).abs().max() < 0.02
    assert 0 < flips < len(dataset)


@pytest.mark.parametrize("cache", [True, False])
def test_batch_loss_has_no_gradient_from_the_masked_half(tiny_sd1, shapes_dir, tmp_path, sd1_lora, cache):
    family, trainable, _ = sd1_lora
    data = masked_copy(shapes_dir, tmp_path / "d")
    cfg = config(tiny_sd1, data, tmp_path / "o", random_flip=True, cache_latents=cache)
    dataset, _ = build_dataset(cfg, read_images(cfg.data), family, trainable.models)
    batch = collate([dataset[i] for i in range(8)])
    outputs = []

    def keep(module, args, output):
        output.retain_grad()
        outputs.append(output)

    hook = family.denoiser.conv_out.register_forward_hook(keep)  # the UNet's prediction (B, 4, h, w)
    try:
        batch_loss(family, trainable.models, batch, Objective.from_config(cfg.objective, family.noise_scheduler),
                   torch.float32).backward()  # fmt: skip
    finally:
        hook.remove()
    grad = outputs[0].grad
    weights = F.adaptive_avg_pool2d(batch["mask"].float(), grad.shape[-2:])  # (B, 1, h, w), per item: flipped or not
    assert torch.all(grad[weights.expand_as(grad) == 0] == 0)
    assert torch.all(grad[weights.expand_as(grad) == 1] != 0)
    left_zero = weights[:, 0, :, 0] == 0
    assert left_zero.any() and (~left_zero).any()  # both orientations occurred: the mask flipped with its image


def test_an_all_black_mask_is_refused_before_loading(shapes_dir, tmp_path):
    """A mask of weight 0 everywhere would train on nothing: refused, naming the file (the reliability table runs
    it through the command line too)."""
    data = masked_copy(shapes_dir, tmp_path / "d", make_mask=lambda size: Image.new("L", size, 0))
    with pytest.raises(UserError, match="every pixel is black"):
        train(config("no-model-needed", data, tmp_path / "o"), LORA)


def test_masked_cached_and_uncached_losses_agree_and_a_changed_mask_is_recached(tiny_sd1, shapes_dir, tmp_path):
    data = masked_copy(shapes_dir, tmp_path / "d")
    cache = tmp_path / "cache"
    cached = train(config(tiny_sd1, data, tmp_path / "a", cache_dir=str(cache)), LORA)
    uncached = train(config(tiny_sd1, data, tmp_path / "b", cache_latents=False), LORA)
    assert cached.losses == pytest.approx(uncached.losses, rel=1e-4)
    plain = train(config(tiny_sd1, shapes_dir, tmp_path / "c", cache_dir=str(cache)), LORA)
    assert plain.losses != cached.losses
    for mask in data.glob("*_mask.png"):
        Image.new("L", (64, 64), 255).save(mask)
    full = train(config(tiny_sd1, data, tmp_path / "e", cache_dir=str(cache)), LORA)
    assert full.losses == pytest.approx(plain.losses, rel=1e-5)  # an all-white mask is no mask
