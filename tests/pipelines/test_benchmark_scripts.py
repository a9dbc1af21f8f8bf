"""The sampling and generation-speed benchmarks, run tiny: they count what they claim to count, make the same images
as `pipelines.generate`, and refuse bad flags with one line before any model loads."""

from __future__ import annotations

import numpy as np
import pytest

from difftune.core.errors import UserError
from difftune.pipelines import generate
from difftune.scripts import benchmark_generation, benchmark_sampling
from difftune.scripts.benchmark_generation import split_guidance
from difftune.scripts.benchmark_sampling import UNetCounter, sample_in_turns


def test_sampling_benchmark_counts_unet_calls_and_writes_its_outputs(tiny_sd1, tmp_path):
    prompt_file = tmp_path / "prompts.txt"
    prompt_file.write_text("a red circle\na blue square\n")
    args = ["--model", str(tiny_sd1), "--samplers", "ddim,heun", "--steps", "3", "--seeds_per_prompt", "2"]
    args += ["--prompt_file", str(prompt_file), "--reference_steps", "4", "--output_dir", str(tmp_path / "bench")]
    result = benchmark_sampling.main(args)
    evals = {(r["sampler"], r["steps"]): r["unet_evals_per_image"] for r in result["rows"]}
    # Heun's 2nd-order steps call the UNet twice except on the last step; PNDM (PLMS) spends one extra call to start.
    assert evals == {("ddim", 3): 3, ("heun", 3): 5, ("pndm", 50): 51}
    assert [r["reference_row"] for r in result["rows"]] == [False, False, True]
    assert result["family"] == "sd1"
    assert all(r["frechet_distance"] >= 0 for r in result["rows"])
    for name in ("results.json", "results.md", "quality_vs_steps.png"):
        assert (tmp_path / "bench" / name).is_file()


def test_sampling_benchmark_rows_taking_turns_make_the_same_images_as_rows_run_alone(tiny_sd1, tmp_path):
    base = dict(model=str(tiny_sd1), prompt=["-"], output_dir=str(tmp_path), steps=2, batch_size=1)
    configs = [generate.GenerateConfig(**base, sampler=name) for name in ("dpmpp-sde", "ddim")]
    specs = generate.plan_images(["a red circle", "a blue square"], 1, 0)
    pipe, _, _ = generate.prepare_pipeline(configs[0])
    counter = UNetCounter(pipe.unet)
    in_turns = sample_in_turns(pipe, counter, configs, specs, (32, 32))
    for cfg, run in zip(configs, in_turns, strict=True):
        (alone,) = sample_in_turns(pipe, counter, [cfg], specs, (32, 32))
        assert run["unet_evals_per_image"] == alone["unet_evals_per_image"] == 2
        for a, b in zip(run["images"], alone["images"], strict=True):
            assert np.array_equal(np.asarray(a), np.asarray(b))


def test_unbatched_guidance_baseline_of_the_speed_benchmark_computes_the_same_images(tiny_sd1, tmp_path):
    cfg = generate.GenerateConfig(model=str(tiny_sd1), prompt=["-"], output_dir=str(tmp_path), steps=2)
    specs = generate.plan_images(["a red circle", "a blue square"], 1, 0)
    pipe, _, _ = generate.prepare_pipeline(cfg)
    batched = np.stack([np.asarray(im) for im in generate.generate_batch(pipe, specs, cfg, 32, 32)])
    calls = []  # conv_in runs once per UNet forward; the wrapped forward bypasses hooks on the UNet itself
    pipe.unet.conv_in.register_forward_pre_hook(lambda _m, args: calls.append(args[0].shape[0]))
    split_guidance(pipe)
    split = np.stack([np.asarray(im) for im in generate.generate_batch(pipe, specs, cfg, 32, 32)])
    assert calls == [2, 2, 2, 2]  # 2 steps x (unconditional, conditional), each on the 2 images
    assert np.abs(split.astype(int) - batched.astype(int)).max() <= 1


@pytest.mark.parametrize(
    "args, words",
    [
        (["--samplers", "ddim,dpm++"], ["unknown sampler 'dpm++'", "unipc"]),
        (["--steps", "5,x"], ["--steps must be a comma-separated list"]),
        (["--steps", "0"], ["--steps must be at least 1"]),
        (["--reference_steps", "1000"], ["ddpm cannot run --reference_steps 1000", "use --reference_steps 999"]),
        (["--seeds_per_prompt", "2.5"], ["--seeds_per_prompt must be an integer"]),
        (["--guidance_scale", "nan"], ["--guidance_scale must be a finite number"]),
        (["--sample", "ddim"], ["unknown flag --sample", "did you mean --samplers"]),
    ],
)
def test_sampling_benchmark_refuses_bad_flags_before_loading(tiny_sd1, tmp_path, args, words):
    with pytest.raises(UserError) as err:
        benchmark_sampling.main(["--model", str(tiny_sd1), "--output_dir", str(tmp_path / "b"), *args])
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize(
    "args, words",
    [
        (["--sampler", "dpm++"], ["--sampler dpm++: unknown", "unipc"]),
        (["--repeats", "0"], ["--repeats must be at least 1"]),
        (["--lora", "missing.safetensors"], ["LoRA 'missing.safetensors' not found"]),
        (["--sampler", "ddim", "--steps", "1000"], ["ddim cannot run --steps 1000", "use --steps 999"]),
    ],
)
def test_generation_benchmark_refuses_bad_flags_before_loading(tiny_sd1, tmp_path, args, words):
    with pytest.raises(UserError) as err:
        benchmark_generation.main(["--model", str(tiny_sd1), "--output_dir", str(tmp_path / "b"), *args])
    assert all(w in str(err.value) for w in words), str(err.value)
    assert not (tmp_path / "b").exists()
