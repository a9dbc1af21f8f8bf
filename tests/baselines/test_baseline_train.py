"""The one training loop (fit), the data it trains on (load_tensor) and the command line, run as users run it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch import nn

from baselines import build_model
from baselines.data import load_tensor
from baselines.train import Budget, fit, load_checkpoint, load_model, make_state, save_checkpoint
from core.errors import UserError
from toyworld.shapes import write_dataset

ROOT = Path(__file__).resolve().parents[2]


class Exploding(nn.Module):
    """Follows the protocol; its loss turns non-finite at the third step."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.calls = 0

    def loss(self, x):
        self.calls += 1
        return {"loss": self.w * (x.mean() if self.calls < 3 else float("nan"))}


def tiny_vae():
    torch.manual_seed(0)
    return build_model("vae", resolution=8, channels=3, n_bits=8, hidden=8)


def data(n_per_class: int = 2) -> torch.Tensor:
    return load_tensor(shapes=True, resolution=8, n_per_class=n_per_class, seed=0)[0]


def test_budgets_stop_training():
    x = data()
    by_images = fit(tiny_vae(), x, batch_size=8, lr=1e-3, budget=Budget(images=20), seed=0)
    assert (by_images.steps, by_images.images_seen) == (3, 24)
    by_time = fit(tiny_vae(), x, batch_size=8, lr=1e-3, budget=Budget(seconds=0.0), seed=0)
    assert by_time.steps == 0
    with pytest.raises(UserError, match="budget"):
        fit(tiny_vae(), x, batch_size=8, lr=1e-3, budget=Budget(), seed=0)


def test_non_finite_loss_stops_and_is_reported():
    model = Exploding()
    result = fit(model, data(), batch_size=4, lr=1e-3, budget=Budget(steps=10), seed=0, log_every=1)
    assert result.diverged and result.steps == 2 and len(result.losses) == 2
    assert torch.isfinite(model.w)  # the non-finite loss never reached the weights


def test_resume_from_a_checkpoint_continues_exactly(tmp_path):
    x = data()
    straight = tiny_vae()
    fit(straight, x, batch_size=8, lr=1e-3, budget=Budget(steps=6), seed=3, ema=True)

    first = tiny_vae()
    state = make_state(first, 1e-3, ema=True)
    fit(first, x, batch_size=8, lr=1e-3, budget=Budget(steps=3), seed=3, state=state)
    save_checkpoint(tmp_path / "checkpoint-3", first, state)
    resumed = build_model("vae", resolution=8, channels=3, n_bits=8, hidden=8)  # fresh weights, overwritten
    state = make_state(resumed, 1e-3, ema=True)
    load_checkpoint(tmp_path / "checkpoint-3", resumed, state)
    result = fit(resumed, x, batch_size=8, lr=1e-3, budget=Budget(steps=6), seed=3, state=state)
    assert result.steps == 6
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_load_tensor_shapes_and_folders(tmp_path):
    x, labels = load_tensor(shapes=True, resolution=8, channels=1, n_bits=2, n_per_class=1, seed=0)
    assert x.shape == (12, 1, 8, 8) and labels[0] == "red circle" and len(set(labels)) == 12
    assert torch.equal(torch.round(x * 3) / 3, x)
    write_dataset(tmp_path / "folder", per_class=1, size=16)
    x, labels = load_tensor(train_data_dir=str(tmp_path / "folder"), resolution=8, label_column="label")
    assert x.shape == (12, 3, 8, 8) and labels[0] == "red circle"


def test_load_tensor_rejects_mixed_sizes_and_modes(tmp_path):
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    Image.new("L", (8, 8), 200).save(tmp_path / "b.png")
    x, labels = load_tensor(train_data_dir=str(tmp_path), resolution=8)
    assert x.shape == (2, 1, 8, 8) and labels is None  # grayscale data: one channel
    Image.new("RGB", (8, 8)).save(tmp_path / "c.png")
    with pytest.raises(UserError, match="c.png is colour"):
        load_tensor(train_data_dir=str(tmp_path), resolution=8)
    assert load_tensor(train_data_dir=str(tmp_path), resolution=8, channels=3)[0].shape == (3, 3, 8, 8)
    Image.new("L", (9, 8)).save(tmp_path / "c.png")
    with pytest.raises(UserError, match="c.png is 9x8"):
        load_tensor(train_data_dir=str(tmp_path), resolution=8)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "baselines.train", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_trains_checkpoints_resumes_and_saves(tmp_path):
    common = ["--family", "vae", "--shapes", "--n_per_class", "2", "--resolution", "8", "--max_train_steps", "4",
              "--checkpointing_steps", "2", "--sample_every", "2", "--batch_size", "8",
              "--set", "hidden=8"]  # fmt: skip
    run = run_cli(*common, "--output_dir", str(tmp_path / "a"))
    assert run.returncode == 0, run.stderr
    out = tmp_path / "a"
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-4").is_dir()
    assert Image.open(out / "samples" / "step-000004.png").size == (8 * 9 + 1, 2 * 9 + 1)
    assert list(out.rglob("events.out.tfevents.*"))
    model = load_model(out)
    assert model.config.hidden == 8 and model.sample(2).shape == (2, 3, 8, 8)

    resumed = run_cli(
        *common, "--output_dir", str(tmp_path / "b"), "--resume_from_checkpoint", str(out / "checkpoint-2")
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout + resumed.stderr
    a, b = load_file(out / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # the resumed run ends where the straight one did


def test_cli_rejects_an_unknown_family_in_one_line(tmp_path):
    run = run_cli("--family", "flow", "--shapes", "--max_train_steps", "2", "--output_dir", str(tmp_path))
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        "error: unknown family 'flow'; choose from vae, gan, pixelcnn, glow, ddpm"
    ]
