"""Training the 2026 families on tiny pipelines built with plain diffusers (`toyworld.tiny_families`): a LoRA through
`accelerate launch` that the family's diffusers pipeline class loads and that changes its output, full fine-tuning
to a folder `DiffusionPipeline.from_pretrained` loads, bit-exact resume, the same losses with and without the text
cache (caption dropout included, the empty caption's embedding cached with its mask), and one-line refusals of the
settings that do not apply, before the model loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from difftune.core.config import from_values
from difftune.core.errors import UserError
from difftune.finetune.config import FullTrainConfig, LoraTrainConfig
from difftune.finetune.export_formats import export_format
from difftune.finetune.loop import train
from difftune.finetune.tasks import FULL, LORA
from difftune.pipelines.families import Family, by_name, detect
from difftune.toyworld.tiny_families import FAMILIES, TEST_MAX_SEQUENCE_LENGTH, sample_kwargs

REPO_ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def config(model, data, out, cls=LoraTrainConfig, **kw):
    base = dict(
        pretrained_model_name_or_path=str(model), train_data_dir=str(data), output_dir=str(out), resolution=32,
        center_crop=True, train_batch_size=2, max_train_steps=4, checkpointing_steps=2, learning_rate=1e-3,
        report_to="none", seed=1, max_sequence_length=TEST_MAX_SEQUENCE_LENGTH,
    )  # fmt: skip
    return from_values(cls, {**base, **kw})


def sample(pipe, family: str) -> np.ndarray:
    return pipe(prompt="a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0), **sample_kwargs(family)).images  # fmt: skip


def load(folder) -> DiffusionPipeline:
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# A launched process pays two interpreter starts and imports (~13 s of CPU each here): two families in the default
# run (an LLM with a template and mask; a guidance-distilled one with a BFL export), every family under `-m slow`.
LAUNCHED = [f if f in ("qwen_image", "flux2") else pytest.param(f, marks=pytest.mark.slow) for f in FAMILIES]


def lora_changes_the_pipeline(model, lora, family: str) -> bool:
    """Whether the LoRA in `lora` loads into the family's own diffusers pipeline class and changes its images."""
    pipe = detect(str(model)).pipeline_class().from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    base = sample(pipe, family)
    pipe.load_lora_weights(lora)
    return np.abs(sample(pipe, family) - base).max() > 1e-4


@pytest.mark.parametrize("family", LAUNCHED)
def test_lora_under_accelerate_launch_loads_in_the_pipeline_class_and_changes_its_output(
    family_model, shapes_dir, tmp_path, family
):
    model, out = family_model(family), tmp_path / "lora"
    kohya = ["--output_kohya_format"] if export_format(by_name(family)).kohya else []  # Flux.2's and Chroma's BFL keys
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    proc = subprocess.run(
        [*accelerate, "finetune/finetune_lora.py", "--pretrained_model_name_or_path", str(model), "--train_data_dir",
         str(shapes_dir), "--output_dir", str(out), "--resolution", "32", "--max_train_steps", "2",
         "--train_batch_size", "2", "--learning_rate", "1e-2", "--max_sequence_length", str(TEST_MAX_SEQUENCE_LENGTH),
         "--report_to", "none", "--proportion_empty_prompts", "0.5", *kohya],
        cwd=REPO_ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "pytorch_lora_weights_kohya.safetensors").is_file() == bool(kohya)
    keys = load_file(out / "pytorch_lora_weights.safetensors").keys()
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert lora_changes_the_pipeline(model, out, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_fine_tuning_saves_a_pipeline_diffusers_loads(family_model, shapes_dir, tmp_path, family):
    model = family_model(family)
    result = train(config(model, shapes_dir, tmp_path, FullTrainConfig, max_train_steps=2, learning_rate=1e-2), FULL)
    assert result.global_step == 2 and all(np.isfinite(result.losses))
    tuned, base = load(tmp_path), load(model)
    assert type(tuned) is type(base)
    assert (
        np.abs(sample(tuned, family) - sample(base, family)).max() > 1e-4
    )  # the trained transformer, the rest the base's


@pytest.mark.parametrize("family", FAMILIES)
def test_lora_resumes_bit_exactly_and_uncached_text_gives_the_same_losses(
    family_model, shapes_dir, tmp_path, family, caplog
):
    """The LoRA loads into the pipeline class and changes its images; resuming continues bit-exactly; half of the
    captions dropped, the empty caption's cached embedding (and mask) stands in for the encoder's. Without the cache,
    one line says what keeping the text encoder costs."""
    model, dropout = family_model(family), {"proportion_empty_prompts": 0.5}
    straight = train(config(model, shapes_dir, tmp_path / "a", **dropout), LORA)
    assert lora_changes_the_pipeline(model, tmp_path / "a", family)
    train(config(model, shapes_dir, tmp_path / "b", max_train_steps=2, **dropout), LORA)
    resumed = train(config(model, shapes_dir, tmp_path / "b", resume_from_checkpoint="latest", **dropout), LORA)
    assert resumed.losses == straight.losses[2:]
    a, b = (load_file(tmp_path / d / "checkpoint-4" / "model.safetensors") for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    uncached = train(config(model, shapes_dir, tmp_path / "c", cache_latents=False, **dropout), LORA)
    assert straight.cached and not uncached.cached
    assert uncached.losses == pytest.approx(straight.losses, rel=1e-4)
    (line,) = [r.getMessage() for r in caplog.records if "text caching is off" in r.getMessage()]
    assert f"the {family} text encoder" in line and "stays loaded beside the transformer" in line


def test_the_text_encoder_is_freed_before_the_transformer_loads(family_model, shapes_dir, tmp_path, monkeypatch):
    """With cached text an LLM family encodes every caption (and the validation prompt) with its text encoder
    alone, before the transformer loads; the family that trains holds no text encoder, and validation images come
    from the cached embeddings."""
    from difftune.finetune import loop

    events, loaded = [], []
    load_text, load_all = Family.load_text.__func__, Family.load.__func__

    def text_only(cls, *args, **kwargs):
        events.append("text encoder")
        return load_text(cls, *args, **kwargs)

    def the_rest(cls, *args, **kwargs):
        events.append("transformer")
        loaded.append(load_all(cls, *args, **kwargs))
        return loaded[-1]

    monkeypatch.setattr(Family, "load_text", classmethod(text_only))
    monkeypatch.setattr(Family, "load", classmethod(the_rest))
    assert loop.Family is Family
    cfg = config(family_model(FAMILIES[0]), shapes_dir, tmp_path, max_train_steps=1, validation_prompt=["a blue square"],
                 validation_steps=1, num_validation_images=1, validation_inference_steps=1)  # fmt: skip
    train(cfg, LORA)
    assert events == ["text encoder", "transformer"]
    (family,) = loaded
    assert family.text_encoders() == {} and family.parts["text_encoder"] is None
    assert {"a blue square", ""} <= set(family.text_embeddings)
    assert (tmp_path / "validation" / "step-1" / "grid.png").is_file()


def test_the_text_pass_runs_on_the_cpu_when_the_encoder_does_not_fit_the_gpu(monkeypatch, caplog):
    from difftune.finetune.text_pass import text_device

    encoder = [torch.nn.Linear(1024, 1024)]  # 4 MiB of fp32 weights
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (64 * 2**20, 80 * 2**20))
    assert text_device(encoder, cuda) == cuda
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (4 * 2**20, 80 * 2**20))
    assert text_device(encoder, cuda) == torch.device("cpu")
    assert "encoding the captions on the CPU" in caplog.text
    assert text_device(encoder, torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("adapter", ["dora", "loha", "lokr"])
def test_the_other_adapters_train_and_save(family_model, shapes_dir, tmp_path, adapter):
    """DoRA in diffusers' file (the pipeline class loads it), LoHa and LoKr in peft's own layout, as for every
    family."""
    family = "flux2_klein"
    train(config(family_model(family), shapes_dir, tmp_path, max_train_steps=1, adapter=adapter), LORA)
    if adapter == "dora":
        pipe = load(family_model(family))
        base = sample(pipe, family)
        pipe.load_lora_weights(tmp_path)
        assert np.abs(sample(pipe, family) - base).max() > 0  # DoRA's magnitudes change the weights from step 0
    else:
        assert (tmp_path / "transformer" / "adapter_model.safetensors").is_file()


NOT_APPLYING = [
    ("qwen_image", {"train_text_encoder": True}, "--train_text_encoder does not apply to qwen_image models"),
    ("qwen_image", {"guidance_scale": 3.5}, "--guidance_scale does not apply to qwen_image models"),
    ("qwen_image", {"snr_gamma": 5.0}, "--snr_gamma does not apply to qwen_image models .QwenImagePipeline, flow"),
    ("qwen_image", {"output_kohya_format": True}, "--output_kohya_format is not written for qwen_image models"),
    ("qwen_image", {"max_sequence_length": 2000}, "--max_sequence_length 2000 is beyond Qwen-Image's limit of 1024"),
    ("flux2", {"train_text_encoder": True}, "--train_text_encoder does not apply to flux2 models .Flux2Pipeline"),
    ("flux2", {"prediction_type": "v_prediction"}, "--prediction_type does not apply to flux2 models"),
    ("flux2_klein", {"guidance_scale": 3.5}, "--guidance_scale does not apply to flux2_klein models"),
    ("flux2_klein", {"train_text_encoder": True}, "--train_text_encoder does not apply to flux2_klein models"),
    ("z_image", {"guidance_scale": 3.5}, "--guidance_scale does not apply to z_image models .ZImagePipeline"),
    ("z_image", {"output_kohya_format": True}, "--output_kohya_format is not written for z_image models"),
    ("z_image", {"noise_offset": 0.1}, "--noise_offset does not apply to z_image models"),
    ("chroma", {"train_text_encoder": True}, "--train_text_encoder does not apply to chroma models .ChromaPipeline"),
    ("chroma", {"guidance_scale": 3.5}, "--guidance_scale does not apply to chroma models"),
    ("chroma", {"max_sequence_length": 2000}, "--max_sequence_length 2000 is beyond the T5 tokenizer's limit"),
]


@pytest.mark.parametrize("family, settings, message", NOT_APPLYING)
def test_settings_that_do_not_apply_are_one_line_before_loading(
    family_model, shapes_dir, tmp_path, family, settings, message, monkeypatch
):
    def loading(*args, **kwargs):
        raise AssertionError("a component was loaded before the settings were checked")

    model = family_model(family)
    monkeypatch.setattr(Family, "load", classmethod(loading))
    monkeypatch.setattr(Family, "load_text", classmethod(loading))
    with pytest.raises(UserError, match=message) as err:
        train(config(model, shapes_dir, tmp_path, **settings), LORA)
    assert "\n" not in str(err.value)


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_a_lora_overfit_on_one_image_brings_samples_to_it(family_model, tmp_path, family):
    """300 steps on one image pull the samples of its caption toward its latents. Measured on the latents the
    pipeline samples: the tiny VAE is random and cannot reconstruct an image, so pixels could not show it, while the
    random tiny transformer itself is pulled (no trained base needed, unlike the pixel test of the SD 3 base)."""
    import json

    from difftune.finetune.cache import to_tensor
    from difftune.pipelines.families import read_model_index
    from difftune.toyworld import shapes
    from difftune.toyworld.tiny_families import unpack_latents

    data, model = tmp_path / "one", family_model(family)
    shapes.write_dataset(data, ("yellow",), ("square",), per_class=1, seed=5)
    cfg = config(model, data, tmp_path / "lora", train_batch_size=1, max_train_steps=300, learning_rate=3e-3, rank=16,
                 lora_alpha=16, checkpointing_steps=1000)  # fmt: skip
    train(cfg, LORA)
    caption = json.loads((data / "metadata.jsonl").read_text().splitlines()[0])["text"]
    pixels = to_tensor(Image.open(next(data.glob("*.png"))).convert("RGB").resize((32, 32)))[None]
    fam = detect(str(model)).load(str(model), read_model_index(str(model)),
                                  options={"max_sequence_length": TEST_MAX_SEQUENCE_LENGTH})  # fmt: skip
    with torch.no_grad():
        target = fam.normalize(fam.posterior(pixels).chunk(2, dim=1)[0])  # the image's latents (posterior mean)
    pipe = load(model)

    def sampled(seed: int) -> torch.Tensor:  # the last step's latents, in every pipeline's own layout
        seen = {}

        def keep(pipeline, i, t, tensors):
            seen["latents"] = tensors["latents"]
            return tensors

        pipe(prompt=caption, num_inference_steps=20, height=32, width=32, output_type="latent", callback_on_step_end=keep,
             generator=torch.Generator().manual_seed(seed), **sample_kwargs(family))  # fmt: skip
        return unpack_latents(family, seen["latents"], tuple(target.shape))

    def distance() -> float:
        return float(np.mean([((sampled(seed) - target) ** 2).mean() for seed in range(3)]))

    before = distance()
    pipe.load_lora_weights(tmp_path / "lora")
    after = distance()
    assert after <= 0.75 * before, (before, after)
