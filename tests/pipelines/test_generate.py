"""`pipelines.generate` as users run it: seeded images repeat, records regenerate, LoRAs load and scale, errors are
one line with exit code 2. Tiny pipelines built in the test; nothing from the Hub."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from PIL import Image
from safetensors.torch import save_file

from difftune.core.errors import UserError, run_main
from difftune.pipelines import generate
from difftune.toyworld.tiny import save_tiny_pipeline

REPO = Path(__file__).resolve().parents[2]
FAST = ["--steps", "2", "--sampler", "ddim"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {family: save_tiny_pipeline(root / family, family=family) for family in ("sd1", "sd2", "sdxl")}


@pytest.fixture(scope="module")
def loras(models, tmp_path_factory):
    """A diffusers-format LoRA folder and a kohya-format file of the same adapter for the sd1 tiny model."""
    root = tmp_path_factory.mktemp("loras")
    pipe = StableDiffusionPipeline.from_pretrained(models["sd1"])
    torch.manual_seed(0)
    pipe.unet.add_adapter(
        LoraConfig(
            r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=["to_k", "to_q", "to_v", "to_out.0"]
        )
    )
    for name, param in pipe.unet.named_parameters():
        if "lora_B" in name:  # a trained adapter, not the identity it starts as
            torch.nn.init.normal_(param, std=0.5)
    peft_state = get_peft_model_state_dict(pipe.unet)
    StableDiffusionPipeline.save_lora_weights(
        root / "diffusers", unet_lora_layers=convert_state_dict_to_diffusers(peft_state), safe_serialization=True
    )
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_state.items()})
    assert all(k.startswith("lora_unet_") for k in kohya)
    save_file(kohya, root / "pytorch_lora_weights_kohya.safetensors")
    return {"diffusers": root / "diffusers", "kohya": root / "pytorch_lora_weights_kohya.safetensors"}


def pixels(folder: Path, name: str = "00000_seed0.png") -> np.ndarray:
    return np.asarray(Image.open(folder / name), dtype=np.int16)


def gen(tmp_path: Path, name: str, *args: str) -> Path:
    out = tmp_path / name
    generate.main([*args, "--output_dir", str(out)])
    return out


def test_same_seed_same_pixels_and_files(models, tmp_path):
    args = ["--model", str(models["sd1"]), "--prompt", "a red circle", "--num_images", "2", *FAST]
    a, b = gen(tmp_path, "a", *args), gen(tmp_path, "b", *args)
    assert np.array_equal(pixels(a), pixels(b))
    assert not np.array_equal(pixels(a), pixels(a, "00001_seed1.png"))  # each image has its own seed
    assert (a / "grid.png").is_file()
    assert Image.open(a / "grid.png").size == (2 + 32 + 2 + 32 + 2, 2 + 32 + 2)  # two 32x32 images, padded


def test_record_regenerates_an_image_exactly(models, tmp_path):
    args = ["--model", str(models["sd1"]), "--prompt", "a red circle", "--prompt", "a blue square"]
    out = gen(tmp_path, "run", *args, "--num_images", "2", "--batch_size", "3", "--sampler", "euler-a", "--steps", "3")
    record = json.loads((out / "record.json").read_text())
    assert [row["seed"] for row in record["images"]] == [0, 1, 2, 3]
    assert record["images"][3]["prompt"] == "a blue square"
    again = tmp_path / "again"
    generate.main(["--from_record", str(out / "record.json"), "--index", "3", "--output_dir", str(again)])
    assert sorted(p.name for p in again.glob("0*.png")) == ["00003_seed3.png"]
    assert np.array_equal(pixels(out, "00003_seed3.png"), pixels(again, "00003_seed3.png"))


def test_lora_changes_output_and_scale_zero_restores_it(models, loras, tmp_path):
    args = ["--model", str(models["sd1"]), "--prompt", "a red circle", *FAST]
    base = pixels(gen(tmp_path, "base", *args))
    with_lora = pixels(gen(tmp_path, "lora", *args, "--lora", str(loras["diffusers"])))
    zero = pixels(gen(tmp_path, "zero", *args, "--lora", str(loras["diffusers"]), "--lora_scale", "0"))
    assert np.abs(with_lora - base).max() > 10
    assert np.array_equal(zero, base)


def test_kohya_file_loads_as_the_same_adapter(models, loras, tmp_path):
    args = ["--model", str(models["sd1"]), "--prompt", "a red circle", *FAST]
    diffusers_format = pixels(gen(tmp_path, "d", *args, "--lora", str(loras["diffusers"])))
    kohya_format = pixels(gen(tmp_path, "k", *args, "--lora", str(loras["kohya"])))
    fused = pixels(gen(tmp_path, "f", *args, "--lora", str(loras["kohya"]), "--fuse_lora"))
    assert np.abs(kohya_format - diffusers_format).max() <= 1
    assert np.abs(fused - kohya_format).max() <= 2  # folding the weights only changes rounding


@pytest.mark.parametrize("family", ["sd2", "sdxl"])
def test_sd2_and_sdxl_generate(models, tmp_path, family):
    out = gen(tmp_path, family, "--model", str(models[family]), "--prompt", "a red circle", *FAST)
    record = json.loads((out / "record.json").read_text())
    assert record["family"] == family
    image = pixels(out)
    assert image.shape == (32, 32, 3) and image.std() > 0


def test_classifier_free_guidance_is_one_batched_unet_call_per_step(models, tmp_path):
    cfg = generate.GenerateConfig(model=str(models["sd1"]), prompt=["a red circle"], output_dir=str(tmp_path))
    cfg.steps, cfg.sampler = 3, "ddim"
    pipe, _, _ = generate.prepare_pipeline(cfg)
    assert {type(p).__name__ for p in pipe.unet.attn_processors.values()} == {"AttnProcessor2_0"}  # SDPA
    batch_sizes = []
    pipe.unet.register_forward_pre_hook(
        lambda _m, args, kwargs: batch_sizes.append(args[0].shape[0]), with_kwargs=True
    )
    specs = generate.plan_images(["a red circle", "a blue square"], 1, 0)
    generate.generate_batch(pipe, specs, cfg, 32, 32)
    assert batch_sizes == [4, 4, 4]  # 3 steps, each one call on (unconditional + conditional) x 2 images


def run_cli(args: list[str], module: bool) -> subprocess.CompletedProcess:
    entry = ["-m", "difftune.pipelines.generate"] if module else [str(REPO / "pipelines" / "generate.py")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *entry, *args], capture_output=True, text=True, cwd=REPO, env=env)


def assert_one_line_error(stderr: str, *words: str) -> None:
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    assert all(w in errors[0] for w in words), errors[0]


def test_missing_model_is_one_line_exit_2(tmp_path):
    result = run_cli(["--model", str(tmp_path / "nope"), "--prompt", "x", "--output_dir", str(tmp_path)], True)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "not found")


def test_size_the_model_cannot_make_is_one_line_exit_2(models, tmp_path):
    args = ["--model", str(models["sd1"]), "--prompt", "x", "--height", "36", "--output_dir", str(tmp_path)]
    result = run_cli(args, False)
    assert result.returncode == 2
    assert_one_line_error(result.stderr, "multiples of 8", "36")


def test_lora_that_does_not_fit_is_one_line_exit_2(models, loras, tmp_path, capsys):
    args = ["--model", str(models["sdxl"]), "--prompt", "x", "--lora", str(loras["diffusers"]), *FAST]
    with pytest.raises(SystemExit) as exit_info:
        run_main(generate.main, [*args, "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "does not fit this model", "size mismatch")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--sampler", "dpm++"], ["--sampler dpm++: unknown", "unipc"]),
        (["--lora", "missing.safetensors"], ["not found"]),
        (["--lora_scale", "0.5", "--lora_scale", "1"], ["no --lora"]),
    ],
)
def test_other_bad_input_raises_user_error(models, tmp_path, args, words):
    with pytest.raises(UserError) as err:
        generate.main(["--model", str(models["sd1"]), "--prompt", "x", "--output_dir", str(tmp_path), *args])
    assert all(w in str(err.value) for w in words)
