"""`pipelines.generate`'s command line: one typed config (flags, repeated flags, YAML), and bad input refused with
one `error:` line and exit code 2 before any model loads."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from difftune.core.config import parse
from difftune.core.errors import run_main
from difftune.pipelines import generate

REPO = Path(__file__).resolve().parents[2]
FAST = ["--steps", "2", "--sampler", "ddim"]


@pytest.fixture()
def no_model_load(monkeypatch):
    """Fails the test if generation gets as far as loading weights."""

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr(generate, "load_pipeline", refuse)


@pytest.fixture(scope="module")
def prk_model(tmp_path_factory, tiny_sd1):
    """The tiny pipeline with a scheduler config that does not skip PNDM's Runge-Kutta warm-up (as the original
    PNDM configs, and every config PNDM is built from without the key, e.g. SDXL's Euler one)."""
    model = tmp_path_factory.mktemp("prk") / "model"
    shutil.copytree(tiny_sd1, model)
    path = model / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "skip_prk_steps": False}))
    return model


def one_line_error(capsys, argv: list[str]) -> str:
    """The single `error:` line `run_main` prints for `argv`, after checking the exit code is 2."""
    with pytest.raises(SystemExit) as exit_info:
        run_main(generate.main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def bad_inputs(tmp_path: Path) -> list[tuple[list[str], list[str]]]:
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(bytes(range(256)) * 4)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    empty_lora_dir = tmp_path / "empty_lora"
    empty_lora_dir.mkdir()
    limit, huge = str(2**63 - 1), str(10**20)
    return [
        (["--seed", huge], [f"--seed {huge} out of range", "0.." + limit]),
        (["--seed", "-1"], ["--seed -1 out of range"]),
        (["--seed", limit, "--num_images", "2"], ["seeds up to " + str(2**63), "use a smaller --seed"]),
        (["--guidance_scale", "nan"], ["--guidance_scale must be a finite number, got nan"]),
        (["--guidance_scale", "inf"], ["--guidance_scale must be a finite number"]),
        (["--output_dir", str(a_file)], [f"--output_dir {a_file} is a file"]),
        (["--output_dir", str(a_file / "sub")], [f"is inside {a_file}, which is a file"]),
        (["--lora", str(tmp_path / "missing.safetensors")], ["missing.safetensors", "not found"]),
        (["--lora", str(garbage)], ["garbage.safetensors is not a readable safetensors file"]),
        (["--lora", str(empty_lora_dir)], ["no LoRA weights in"]),
        (["--lora_scale", "0.5", "1"], ["--lora_scale given more than once but no --lora"]),
        (["--sampler", "ddim", "--steps", "1000"], ["sampler ddim cannot run --steps 1000", "use --steps 999"]),
        (["--steps", "0"], ["--steps must be at least 1"]),
        (["--sampler", "dpm++"], ["--sampler dpm++: unknown", "unipc"]),
        (["--dtype", "fp16"], ["--dtype fp16 needs --device cuda"]),
        (["--device", "gpu"], ["--device 'gpu' is not a device"]),
        (["--index", "1"], ["--index only goes with --from_record"]),
        (["--lorra", "x"], ["unknown flag --lorra", "did you mean --lora?"]),
    ]


def test_every_bad_input_is_one_line_exit_2_before_the_model_loads(tiny_sd1, tmp_path, capsys, no_model_load):
    for args, words in bad_inputs(tmp_path):
        argv = ["--model", str(tiny_sd1), "--prompt", "x", "--output_dir", str(tmp_path / "out"), *args]
        line = one_line_error(capsys, argv)
        assert all(w in line for w in words), (args, line)
    assert not (tmp_path / "out").exists()


def test_pndm_with_too_few_steps_for_its_warm_up_says_what_to_use(prk_model, tmp_path, capsys, no_model_load):
    argv = ["--model", str(prk_model), "--prompt", "x", "--sampler", "pndm", "--output_dir", str(tmp_path)]
    line = one_line_error(capsys, [*argv, "--steps", "3"])
    assert "sampler pndm cannot run --steps 3" in line and "broadcast" in line and "use --steps 4" in line
    cfg = parse(generate.GenerateConfig, [*argv, "--steps", "4"])  # the advice holds
    assert cfg.steps == 4


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="needs a /proc to stand for a folder nobody can write into")
def test_output_dir_that_cannot_be_written_is_one_line(tiny_sd1, capsys, no_model_load):
    # Permission bits do not stop root (these tests may run as root); /proc refuses new files to everyone.
    line = one_line_error(capsys, ["--model", str(tiny_sd1), "--prompt", "x", "--output_dir", "/proc/difftune_out"])
    assert "--output_dir /proc/difftune_out: cannot write into /proc" in line


def test_huge_seed_from_the_command_line_is_one_line_exit_2(tiny_sd1, tmp_path):
    args = ["--model", str(tiny_sd1), "--prompt", "x", "--seed", str(10**20), "--output_dir", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "difftune.pipelines.generate", *args], capture_output=True, text=True, cwd=REPO, env=env
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"--seed {10**20} out of range" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_repeated_list_flags_add_up_like_several_values(tiny_sd1, tmp_path):
    base = ["--model", str(tiny_sd1), "--output_dir", str(tmp_path)]
    repeated = parse(generate.GenerateConfig, [*base, "--prompt", "a red", "--prompt", "b"])
    several = parse(generate.GenerateConfig, [*base, "--prompt", "a red", "b"])
    assert repeated.prompt == several.prompt == ["a red", "b"]
    lora = tmp_path / "l.safetensors"
    from safetensors.torch import save_file
    from torch import zeros

    save_file({"unet.x.lora_A.weight": zeros(1)}, lora)
    mixed = parse(generate.GenerateConfig, [*base, "--prompt", "p", "--lora", str(lora), "--lora_scale", "-0.5",
                                            "--seed", "3", "--lora", str(lora), "--lora_scale", "1"])  # fmt: skip
    assert mixed.lora_scale == [-0.5, 1.0] and mixed.seed == 3 and len(mixed.lora) == 2


def test_yaml_config_fills_the_same_fields(tiny_sd1, tmp_path):
    config = tmp_path / "gen.yaml"
    config.write_text(f"model: {tiny_sd1}\nprompt: [a red circle, a blue square]\nsteps: 4\nguidance_scale: 5e0\n")
    cfg = parse(generate.GenerateConfig, ["--config", str(config), "--steps", "3", "--output_dir", str(tmp_path)])
    assert (cfg.prompt, cfg.steps, cfg.guidance_scale) == (["a red circle", "a blue square"], 3, 5.0)
    config.write_text("prompts: [x]\n")
    with pytest.raises(Exception, match="unknown key 'prompts'; did you mean 'prompt'"):
        parse(generate.GenerateConfig, ["--config", str(config)])


def test_from_record_refuses_settings_it_would_ignore(tmp_path, capsys, no_model_load):
    record = tmp_path / "record.json"
    record.write_text("{}")
    line = one_line_error(capsys, ["--from_record", str(record), "--steps", "5"])
    assert "--steps cannot change them" in line
    line = one_line_error(capsys, ["--from_record", str(record)])
    assert "is not a generate record" in line
