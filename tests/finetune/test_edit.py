"""Edit training on pairs with a tiny Flux Kontext pipeline built with plain diffusers: the control image enters the
transformer as the pipeline feeds it, an edit LoRA trains and changes the pipeline's edits, resume is exact, cached
and uncached losses agree, pairs stay together through flips and buckets, and bad combinations are one line."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxKontextPipeline
from PIL import Image
from safetensors.torch import load_file

from difftune.core.config import from_values
from difftune.core.errors import UserError
from difftune.finetune.config import LoraTrainConfig
from difftune.finetune.data import build_dataset, read_images
from difftune.finetune.loop import train
from difftune.finetune.tasks import LORA
from difftune.pipelines.families import detect, read_model_index
from difftune.pipelines.families.flux import pack, unpack
from difftune.toyworld import shapes
from difftune.toyworld.tiny import save_tiny_pipeline

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def kontext(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("kontext") / "model", size="test", family="flux-kontext")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "data"
    shapes.write_edit_dataset(out, ("red", "blue"), ("green",), ("circle", "square"), per_class=1, seed=0)
    return out


def config(model, data, out, **kw) -> LoraTrainConfig:
    base = dict(
        pretrained_model_name_or_path=str(model), train_data_dir=str(data), output_dir=str(out), resolution=32,
        center_crop=True, train_batch_size=2, max_train_steps=4, checkpointing_steps=2, learning_rate=1e-3,
        report_to="none", seed=1, max_sequence_length=16,
    )  # fmt: skip
    base.update(kw)
    return from_values(LoraTrainConfig, base)


def edit(pipe, image: Image.Image) -> np.ndarray:
    return pipe(image=image, prompt="make it green", num_inference_steps=2, height=32, width=32, max_area=32 * 32,
                _auto_resize=False, max_sequence_length=16, output_type="np",
                generator=torch.Generator().manual_seed(0)).images  # fmt: skip


def load_family(model):
    family_cls = detect(str(model))
    return family_cls.load(str(model), read_model_index(str(model)), options={"max_sequence_length": 16})


@torch.no_grad()
def test_the_control_image_enters_the_transformer_as_the_pipeline_feeds_it(kontext, pairs):
    pipe = FluxKontextPipeline.from_pretrained(kontext)
    family = load_family(kontext)
    assert family.name == "flux-kontext"
    control = Image.open(next((pairs / "control").glob("*.png"))).convert("RGB").resize((32, 32))
    pixels = pipe.image_processor.preprocess(control, 32, 32)  # (1, 3, 32, 32) in [-1, 1]
    expected_latents = pipe._encode_vae_image(pixels, generator=None)
    ours = family.image_latents(pipe.vae.encode(pixels).latent_dist.parameters)
    torch.testing.assert_close(ours, expected_latents)  # the posterior's mode, shifted and scaled
    c = pipe.transformer.config.in_channels // 4
    generator = torch.Generator().manual_seed(0)
    latents, control_tokens, latent_ids, image_ids = pipe.prepare_latents(
        pixels, 1, c, 32, 32, torch.float32, "cpu", generator
    )
    prompt_embeds, pooled, text_ids = pipe.encode_prompt("make it green", None, max_sequence_length=16)
    t = torch.tensor([700.0])
    guidance = torch.full((1,), 3.5)
    expected = pipe.transformer(
        hidden_states=torch.cat([latents, control_tokens], dim=1), timestep=t / 1000, guidance=guidance,
        pooled_projections=pooled, encoder_hidden_states=prompt_embeds, txt_ids=text_ids,
        img_ids=torch.cat([latent_ids, image_ids]), return_dict=False,
    )[0][:, : latents.shape[1]]  # fmt: skip
    noisy = unpack(latents, 16, 16)
    cond = {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled, "control": [ours]}
    out = family.predict(family.denoiser, noisy, t, cond, {})
    torch.testing.assert_close(pack(out), expected)


def test_an_edit_lora_trains_on_pairs_and_changes_the_pipelines_edits(kontext, pairs, tmp_path):
    result = train(config(kontext, pairs, tmp_path, learning_rate=1e-2, output_kohya_format=True), LORA)
    assert result.global_step == 4 and all(np.isfinite(result.losses))
    assert any(k.startswith("transformer.") for k in load_file(tmp_path / "pytorch_lora_weights.safetensors"))
    assert (tmp_path / "pytorch_lora_weights_kohya.safetensors").is_file()
    assert "flux-kontext" in (tmp_path / "README.md").read_text()
    pipe = FluxKontextPipeline.from_pretrained(kontext)
    pipe.set_progress_bar_config(disable=True)
    control = Image.open(next((pairs / "control").glob("*.png"))).convert("RGB").resize((32, 32))
    before = edit(pipe, control)
    pipe.load_lora_weights(tmp_path)
    assert np.abs(edit(pipe, control) - before).max() > 1e-4


def test_resume_is_bit_exact(kontext, pairs, tmp_path):
    straight = train(config(kontext, pairs, tmp_path / "a"), LORA)
    train(config(kontext, pairs, tmp_path / "b", max_train_steps=2), LORA)
    resumed = train(config(kontext, pairs, tmp_path / "b", resume_from_checkpoint="latest"), LORA)
    assert resumed.losses == straight.losses[2:]
    a, b = (load_file(tmp_path / d / "checkpoint-4" / "model.safetensors") for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_cached_and_uncached_losses_agree_with_flips(kontext, pairs, tmp_path):
    cached = train(config(kontext, pairs, tmp_path / "a", random_flip=True), LORA)
    uncached = train(config(kontext, pairs, tmp_path / "b", random_flip=True, cache_latents=False), LORA)
    assert cached.cached and not uncached.cached
    assert cached.losses == pytest.approx(uncached.losses, rel=1e-4)
    assert any((tmp_path / "a" / ".cache" / "latents").glob("*.safetensors"))


def shape_mask(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels < 0.8).any(dim=0)  # (H, W): where the shape is, whatever its colour


def test_flips_and_crops_move_a_pair_together(kontext, pairs, tmp_path):
    cfg = config(kontext, pairs, tmp_path, random_flip=True, center_crop=False, cache_latents=False, resolution=48)
    family = load_family(kontext)
    dataset, cached = build_dataset(cfg, read_images(cfg.data), family, {})
    flips = 0
    for index in range(len(dataset)):
        for epoch in range(4):
            dataset.start_epoch(epoch)
            item = dataset[index]
            target, control = item["pixels"], item["control_pixels"]["0"]
            assert torch.equal(shape_mask(target), shape_mask(control))  # the same shape in the same place
            flips += not torch.equal(shape_mask(target), shape_mask(target.flip(-1)))
    assert not cached and flips


def test_a_control_of_another_aspect_ratio_keeps_it_and_trains(kontext, tmp_path):
    data = tmp_path / "data"
    (data / "control").mkdir(parents=True)
    rows = []
    for i, size in enumerate([(64, 64), (64, 32)]):  # the second input is twice as wide as its result
        Image.new("RGB", (64, 64), (200, 0, 0)).save(data / f"{i}.png")
        Image.new("RGB", size, (0, 0, 200)).save(data / "control" / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "control_file_name": f"control/{i}.png", "text": "make it red"})
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config(kontext, data, tmp_path / "out", train_batch_size=1, max_train_steps=2)
    dataset, _ = build_dataset(cfg, read_images(cfg.data), load_family(kontext), {})
    assert dataset.buckets() == [((32, 32), (32, 32)), ((32, 32), (48, 16))]  # batches never mix control sizes
    assert dataset[1]["latents"].shape[-2:] == (16, 16) and dataset[1]["control_latents"]["0"].shape[-2:] == (8, 24)
    assert train(cfg, LORA).global_step == 2


def test_validation_renders_edits_of_the_held_out_inputs(kontext, pairs, tmp_path):
    cfg = config(kontext, pairs, tmp_path, max_train_steps=2, validation_prompt=["make it green"], validation_steps=2,
                 validation_split=0.5, validation_inference_steps=2)  # fmt: skip
    train(cfg, LORA)
    edits = sorted((tmp_path / "validation" / "step-2").glob("00_*.png"))
    assert len(edits) == 2 and Image.open(edits[0]).size == (32, 32)


def test_bad_pairings_are_one_line_before_the_model_loads(kontext, pairs, shapes_dir, tmp_path):
    with pytest.raises(UserError, match="is an edit model .FluxKontextPipeline.: it trains on pairs"):
        train(config(kontext, shapes_dir, tmp_path / "a"), LORA)
    flux = save_tiny_pipeline(tmp_path / "flux", size="test", family="flux-schnell")
    with pytest.raises(UserError, match="has control images .edit pairs. but .* is a text-to-image model"):
        train(config(flux, pairs, tmp_path / "b"), LORA)
    with pytest.raises(UserError, match="--control_data_dir does not apply to flux models"):
        train(config(flux, shapes_dir, tmp_path / "c", control_data_dir=[str(shapes_dir)]), LORA)
    with pytest.raises(UserError, match="--validation_prompt on an edit model needs input images to edit"):
        train(config(kontext, pairs, tmp_path / "d", validation_prompt=["make it green"]), LORA)


def guide_commands() -> list[list[str]]:
    """docs/edit.md's commands, each as argv (its ```bash block, continuation lines joined)."""
    block = re.search(r"^```bash\n(.*?)^```", (ROOT / "docs" / "edit.md").read_text(), re.S | re.M).group(1)
    return [shlex.split(line) for line in re.sub(r"\\\n\s*", " ", block).splitlines() if line.strip()]


def test_the_guides_commands_run(kontext, pairs, tmp_path):
    """docs/edit.md's training and editing commands, on the tiny Kontext model and local pairs, shortened by flags
    appended at the end (later flags win)."""
    from difftune.finetune import finetune_lora
    from difftune.pipelines import generate

    photo = next((pairs / "control").glob("*.png"))
    local = {"black-forest-labs/FLUX.1-Kontext-dev": str(kontext), "my_pairs/": str(pairs), "photo.png": str(photo)}

    def localised(argv: list[str]) -> list[str]:
        return [local.get(a, str(tmp_path / a) if a.startswith("out/") else a) for a in argv]

    (train_cmd, *train_argv), (generate_cmd, *generate_argv) = guide_commands()
    assert (train_cmd, generate_cmd) == ("difftune-train-lora", "difftune-generate")
    finetune_lora.main(localised(train_argv) + [
        "--resolution", "32", "--max_train_steps", "2", "--validation_steps", "2", "--validation_split", "0.5",
        "--validation_inference_steps", "2", "--max_sequence_length", "16", "--mixed_precision", "no",
        "--report_to", "none",
    ])  # fmt: skip
    assert (tmp_path / "out" / "kontext-lora" / "pytorch_lora_weights.safetensors").is_file()
    assert list((tmp_path / "out" / "kontext-lora" / "validation" / "step-2").glob("00_*.png"))
    record = generate.main(localised(generate_argv) + ["--steps", "2", "--device", "cpu"])
    assert record["adapters"] and (tmp_path / "out" / "edits" / record["images"][0]["file"]).is_file()
