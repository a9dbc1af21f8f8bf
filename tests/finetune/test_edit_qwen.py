"""Edit training for Qwen-Image-Edit and Qwen-Image-Edit-Plus with tiny pipelines built with plain diffusers
(`toyworld.tiny_families`): the control image enters the transformer and the text encoder as the pipelines feed
them, an edit LoRA trains on pairs and changes the pipeline's edits, resume is exact, cached and uncached losses
agree (the text embeddings, which read the control images, cached per instruction and input images), `pipelines.generate
--image` edits with it, and flags that do not apply are one line.

transformers' `Qwen2VLProcessor.from_pretrained` needs torchvision, which does not import here: the tiny pipelines'
processors are built explicitly from a `Qwen2VLImageProcessorPil` and the project's own tokenizer
(`core.processors.qwen_vl_processor`), and the family reads a saved one the same way. The pipelines size every input
image to about a megapixel, so each VAE encoding of one takes seconds on this CPU: the training tests share one
latent cache and are marked slow where they train more than once.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from difftune.core.config import from_values
from difftune.core.errors import UserError
from difftune.finetune.buckets import stretch_to
from difftune.finetune.cache import to_tensor
from difftune.finetune.config import LoraTrainConfig
from difftune.finetune.loop import train
from difftune.finetune.tasks import LORA
from difftune.pipelines.families import detect, read_model_index
from difftune.pipelines.families.qwen_image_edit import QwenImageEdit, edit_template
from difftune.toyworld import shapes
from difftune.toyworld.tiny_families import save_family_pipeline

PROMPT = "make it green"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-edit")
    return {name: save_family_pipeline(root / name, name) for name in ("qwen-image-edit", "qwen-image-edit-plus")}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs") / "data"
    shapes.write_edit_dataset(out, ("red",), ("green",), ("circle", "square"), per_class=1, seed=0)
    return out


@pytest.fixture(scope="module")
def latent_cache(tmp_path_factory):
    """One latent cache for every run: each megapixel control image is encoded once."""
    return tmp_path_factory.mktemp("latent-cache")


def config(model, data, out, cache_dir=None, **kw) -> LoraTrainConfig:
    base = dict(
        pretrained_model_name_or_path=str(model), train_data_dir=str(data), output_dir=str(out), resolution=32,
        center_crop=True, train_batch_size=2, max_train_steps=4, checkpointing_steps=2, learning_rate=1e-3,
        report_to="none", seed=1, cache_dir=None if cache_dir is None else str(cache_dir),
    )  # fmt: skip
    base.update(kw)
    return from_values(LoraTrainConfig, base)


def load_pipeline(model):
    family_cls = detect(str(model))
    index = read_model_index(str(model))
    return family_cls.pipeline_class().from_pretrained(model, **family_cls.from_pretrained_kwargs(index, str(model)))


def edit(pipe, images: list[Image.Image]) -> np.ndarray:
    image = images[0] if len(images) == 1 else images
    return pipe(image=image, prompt=PROMPT, num_inference_steps=2, height=32, width=32, true_cfg_scale=1.0,
                output_type="np", generator=torch.Generator().manual_seed(0)).images  # fmt: skip


def controls(pairs, count: int) -> list[Image.Image]:
    first = Image.open(sorted((pairs / "control").glob("*.png"))[0]).convert("RGB")
    return [first, first.transpose(Image.Transpose.ROTATE_90).resize((40, 32))][:count]  # the second: wider


@torch.no_grad()
@pytest.mark.parametrize(
    "name, count", [("qwen-image-edit", 1), pytest.param("qwen-image-edit-plus", 2, marks=pytest.mark.slow)]
)
def test_the_control_images_enter_the_transformer_and_the_text_encoder_as_the_pipeline_feeds_them(
    models, pairs, name, count
):
    model = models[name]
    pipe = load_pipeline(model)
    family = detect(str(model)).load(str(model), read_model_index(str(model)))
    assert family.name == name and isinstance(family, QwenImageEdit)
    images = controls(pairs, count)
    template, drop = edit_template(family.pipeline_class_name)
    # the part the pipeline drops: as many tokens as in Qwen's vocabulary
    system = template.split("<|vision_start|>")[0].split("{}")[0]
    assert len(pipe.tokenizer(system).input_ids) == drop
    # the text stream: the instruction in the edit template with the images' tokens, as the pipeline encodes it
    if name == "qwen-image-edit":
        size = family.control_size(images[0].size, (32, 32), (32, 32))
        prompt_images = pipe.image_processor.resize(images[0], size[1], size[0])
    else:
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, VAE_IMAGE_SIZE

        assert (family.text_area, family.vae_area) == (CONDITION_IMAGE_SIZE, VAE_IMAGE_SIZE)
        prompt_images = family.text_images(images)
    embeds, mask = pipe.encode_prompt(PROMPT, image=prompt_images)
    cond = family.encode_text(family.tokenize([PROMPT], [images]))
    torch.testing.assert_close(cond["encoder_hidden_states"], embeds)
    assert mask is None and bool(cond["encoder_hidden_states_mask"].all())
    # the control latents: each image at about a megapixel, the 3D VAE's mode, normalised per channel
    latents = []
    for image in images:
        w, h = family.control_size(image.size, (32, 32), (32, 32))
        assert w * h == pytest.approx(1024 * 1024, rel=0.1) and w % 32 == h % 32 == 0
        pixels = pipe.image_processor.preprocess(image, h, w)  # (1, 3, H, W) in [-1, 1]
        torch.testing.assert_close(to_tensor(stretch_to(image, (w, h)))[None], pixels)  # resized as training does
        expected = pipe._encode_vae_image(pixels[:, :, None], generator=None)[:, :, 0]
        ours = family.image_latents(family.posterior(pixels))
        torch.testing.assert_close(ours, expected)
        latents.append(ours)
    # the transformer: target tokens, then each control's, with img_shapes listing all; the target's output kept
    c = pipe.transformer.config.in_channels // 4
    noisy = torch.randn(1, c, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([700.0])
    tokens = torch.cat([family.pack(noisy), *(family.pack(x) for x in latents)], dim=1)
    shapes_ = [(1, 2, 2), *((1, x.shape[-2] // 2, x.shape[-1] // 2) for x in latents)]
    expected = pipe.transformer(hidden_states=tokens, timestep=t / 1000, encoder_hidden_states=embeds,
                                encoder_hidden_states_mask=None, img_shapes=[shapes_], return_dict=False)[0][:, :4]  # fmt: skip
    out = family.predict(family.denoiser, noisy, t, {**cond, "control": latents}, {})
    torch.testing.assert_close(family.pack(out), expected)


@pytest.mark.slow
def test_an_edit_lora_trains_on_pairs_and_changes_the_pipelines_edits(models, pairs, latent_cache, tmp_path):
    model = models["qwen-image-edit"]
    held_out = sorted((pairs / "control").glob("*.png"))[0]
    validation = dict(validation_prompt=[PROMPT], validation_image=[str(held_out)], validation_steps=4,
                      validation_inference_steps=2)  # fmt: skip
    result = train(config(model, pairs, tmp_path, latent_cache, learning_rate=1e-2, **validation), LORA)
    assert result.global_step == 4 and all(np.isfinite(result.losses))
    assert Image.open(tmp_path / "validation" / "step-4" / "00_00.png").size == (32, 32)  # an edit of the input
    assert any(k.startswith("transformer.") for k in load_file(tmp_path / "pytorch_lora_weights.safetensors"))
    assert "qwen-image-edit" in (tmp_path / "README.md").read_text()
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    images = controls(pairs, 1)
    before = edit(pipe, images)
    pipe.load_lora_weights(tmp_path)
    assert np.abs(edit(pipe, images) - before).max() > 1e-4


@pytest.mark.slow
def test_resume_is_bit_exact(models, pairs, latent_cache, tmp_path):
    model = models["qwen-image-edit"]
    straight = train(config(model, pairs, tmp_path / "a", latent_cache), LORA)
    train(config(model, pairs, tmp_path / "b", latent_cache, max_train_steps=2), LORA)
    resumed = train(config(model, pairs, tmp_path / "b", latent_cache, resume_from_checkpoint="latest"), LORA)
    assert resumed.losses == straight.losses[2:]
    a, b = (load_file(tmp_path / d / "checkpoint-4" / "model.safetensors") for d in ("a", "b"))
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen-image-edit", "qwen-image-edit-plus"])
def test_cached_and_uncached_losses_agree_with_flips(models, pairs, latent_cache, tmp_path, name):
    """Plus with two input images per pair (the metadata's and the control folder's)."""
    model, steps = models[name], dict(max_train_steps=2, train_batch_size=1)
    if name == "qwen-image-edit-plus":
        steps["control_data_dir"] = [str(pairs / "control")]
    cached = train(config(model, pairs, tmp_path / "a", latent_cache, random_flip=True, **steps), LORA)
    uncached = train(config(model, pairs, tmp_path / "b", random_flip=True, cache_latents=False, **steps), LORA)
    assert cached.cached and not uncached.cached
    assert cached.losses == pytest.approx(uncached.losses, rel=1e-4)
    assert any((latent_cache / "text").rglob("*.safetensors"))  # each instruction with its (flipped) inputs


def test_generate_edits_with_the_lora(models, pairs, latent_cache, tmp_path):
    from difftune.pipelines import generate

    model = models["qwen-image-edit"]
    train(config(model, pairs, tmp_path / "lora", latent_cache, max_train_steps=1, learning_rate=1e-2), LORA)
    photo = sorted((pairs / "control").glob("*.png"))[0]
    argv = ["--model", str(model), "--image", str(photo), "--prompt", PROMPT, "--steps", "2", "--device", "cpu",
            "--height", "32", "--width", "32", "--guidance_scale", "1", "--output_dir"]  # fmt: skip
    plain = generate.main([*argv, str(tmp_path / "plain")])
    tuned = generate.main([*argv, str(tmp_path / "tuned"), "--lora", str(tmp_path / "lora")])
    assert tuned["adapters"] and Image.open(tmp_path / "tuned" / tuned["images"][0]["file"]).size == (32, 32)
    a, b = (np.asarray(Image.open(tmp_path / d / r["images"][0]["file"])) for d, r in (("plain", plain),
                                                                                        ("tuned", tuned)))  # fmt: skip
    assert not np.array_equal(a, b)
    with pytest.raises(UserError, match="is an edit model: give the image to edit with --image"):
        generate.main(["--model", str(model), "--prompt", PROMPT, "--output_dir", str(tmp_path / "none")])


def test_flags_that_do_not_apply_are_one_line(models, pairs, tmp_path):
    model = models["qwen-image-edit"]
    with pytest.raises(UserError, match="--max_sequence_length does not apply to QwenImageEditPipeline"):
        train(config(model, pairs, tmp_path / "a", max_sequence_length=16), LORA)
    with pytest.raises(UserError, match="--train_text_encoder"):
        train(config(model, pairs, tmp_path / "b", train_text_encoder=True), LORA)
    from difftune.finetune import finetune_lora

    argv = ["--pretrained_model_name_or_path", str(model), "--train_data_dir", str(pairs), "--output_dir",
            str(tmp_path / "plan"), "--plan"]  # fmt: skip
    with pytest.raises(UserError, match="the memory planner does not model an edit model's control images"):
        finetune_lora.main(argv)
    folders = [str(pairs / "control")] * 3  # and the metadata's control column: four per example
    with pytest.raises(UserError, match="takes 3 control image.s. per example; the data has 4"):
        train(config(models["qwen-image-edit-plus"], pairs, tmp_path / "c", control_data_dir=folders), LORA)


def guide_commands() -> list[list[str]]:
    """docs/edit.md's Qwen-Image-Edit commands, each as argv (the ```bash block of its section)."""
    section = (ROOT / "docs" / "edit.md").read_text().split("## Qwen-Image-Edit", 1)[1]
    block = re.search(r"^```bash\n(.*?)^```", section, re.S | re.M).group(1)
    return [shlex.split(line) for line in re.sub(r"\\\n\s*", " ", block).splitlines() if line.strip()]


@pytest.mark.slow
def test_the_guides_commands_run(models, pairs, latent_cache, tmp_path):
    """docs/edit.md's Qwen-Image-Edit commands on the tiny model and local pairs, shortened by flags appended at the
    end (later flags win)."""
    from difftune.finetune import finetune_lora
    from difftune.pipelines import generate

    photo = sorted((pairs / "control").glob("*.png"))[0]
    local = {"Qwen/Qwen-Image-Edit": str(models["qwen-image-edit"]), "my_pairs/": str(pairs), "photo.png": str(photo)}

    def localised(argv: list[str]) -> list[str]:
        return [local.get(a, str(tmp_path / a) if a.startswith("out/") else a) for a in argv]

    (train_cmd, *train_argv), (generate_cmd, *generate_argv) = guide_commands()
    assert (train_cmd, generate_cmd) == ("difftune-train-lora", "difftune-generate")
    finetune_lora.main(localised(train_argv) + [
        "--resolution", "32", "--max_train_steps", "2", "--validation_steps", "2", "--validation_split", "0.5",
        "--validation_inference_steps", "2", "--mixed_precision", "no", "--report_to", "none",
        "--cache_dir", str(latent_cache),
    ])  # fmt: skip
    out = tmp_path / "out" / "qwen-edit-lora"
    assert (out / "pytorch_lora_weights.safetensors").is_file() and list((out / "validation" / "step-2").glob("00_*"))
    record = generate.main(localised(generate_argv) + ["--steps", "2", "--device", "cpu", "--height", "32", "--width",
                                                       "32"])  # fmt: skip
    assert record["adapters"] and (tmp_path / "out" / "qwen-edits" / record["images"][0]["file"]).is_file()
