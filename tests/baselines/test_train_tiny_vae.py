"""scripts/train_tiny_vae.py trains the embedded base's VAE through the baselines' one loop (`fit`): its warm-up and
cosine decay reach the optimizer, the command line is strict, and the folder it writes loads as an AutoencoderKL."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL

from difftune.baselines.train import Budget, fit, make_state
from difftune.scripts.train_tiny_vae import VAEObjective, fresh_shapes, main, warmup_cosine
from difftune.toyworld.tiny_parts import SIZES, tiny_vae

ROOT = Path(__file__).resolve().parents[2]


def test_the_learning_rate_warms_up_then_decays_to_zero_inside_fit():
    schedule = warmup_cosine(1000)
    assert schedule(0) == pytest.approx(0.01) and 0.97 < schedule(99) <= 1  # warm-up over 100 steps
    assert schedule(500) < schedule(200) < schedule(100) and schedule(1000) == pytest.approx(0.0)
    torch.manual_seed(0)
    model = VAEObjective(tiny_vae(SIZES["test"]))
    state = make_state(model, 1e-3, lr_lambda=warmup_cosine(4))
    fit(model, fresh_shapes, batch_size=2, lr=1e-3, budget=Budget(steps=4), seed=0, state=state)
    assert state.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # decayed, not constant


def test_fresh_shapes_repeat_for_a_seeded_generator_and_differ_between_steps():
    first = fresh_shapes(3, torch.Generator().manual_seed(7))
    assert first.shape == (3, 3, 64, 64) and first.min() >= -1 and first.max() <= 1
    assert torch.equal(first, fresh_shapes(3, torch.Generator().manual_seed(7)))
    assert not torch.equal(first, fresh_shapes(3, torch.Generator().manual_seed(8)))


def test_main_writes_a_vae_that_loads_with_its_scaling_factor(tmp_path):
    vae = main(["--output_dir", str(tmp_path), "--steps", "2", "--batch_size", "2", "--size", "test"])
    loaded = AutoencoderKL.from_pretrained(tmp_path)
    assert loaded.config.scaling_factor == pytest.approx(vae.config.scaling_factor) and vae.config.scaling_factor > 0
    x = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.encode(x).latent_dist.mode(), vae.encode(x).latent_dist.mode())


def test_command_line_runs_as_the_readme_does_and_refuses_a_typo_in_one_line(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = str(ROOT / "scripts" / "train_tiny_vae.py")
    common = ["--output_dir", str(tmp_path / "vae"), "--batch_size", "2", "--size", "test"]
    run = subprocess.run([sys.executable, script, *common, "--steps", "1"], env=env, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "palette error" in run.stdout and (tmp_path / "vae" / "config.json").is_file()
    bad = subprocess.run([sys.executable, script, *common, "--step", "1"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == (
        "error: scripts/train_tiny_vae.py: unknown flag --step; did you mean --steps? (see --help)"
    )
