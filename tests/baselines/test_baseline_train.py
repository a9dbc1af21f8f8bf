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

from difftune.baselines import build_model
from difftune.baselines.data import load_tensor
from difftune.baselines.train import (
    Budget,
    fit,
    load_checkpoint,
    load_model,
    main,
    make_state,
    parse_args,
    save_checkpoint,
)
from difftune.core.errors import UserError, run_main
from difftune.toyworld.shapes import write_dataset

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


def test_budget_fraction_is_the_share_of_the_limit_set():
    assert Budget(steps=300).fraction(images_seen=9600, seconds=50.0, steps=75) == 0.25
    assert Budget(images=32000).fraction(images_seen=8000, seconds=50.0, steps=250) == 0.25
    assert Budget(images=100, steps=10).fraction(images_seen=50, seconds=0.0, steps=8) == 0.8  # the nearer limit


def test_non_finite_loss_stops_and_is_reported():
    model = Exploding()
    result = fit(model, data(), batch_size=4, lr=1e-3, budget=Budget(steps=10), seed=0, log_every=1)
    assert result.diverged and result.steps == 2 and len(result.losses) == 2
    assert torch.isfinite(model.w)  # the non-finite loss never reached the weights


def tiny(family: str, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    options = {"vae": {"hidden": 8}, "gan": {"hidden": 8, "style_dim": 8, "n_mlp": 1}}[family]
    return build_model(family, resolution=8, channels=3, n_bits=8, **options)


@pytest.mark.parametrize("family", ["vae", "gan"])  # one AdamW through accelerate; two optimizers stepped by the GAN
def test_resume_from_a_checkpoint_continues_exactly(tmp_path, family):
    """3 steps, checkpoint, a fresh process-like restore, 3 more: bit-identical to 6 steps straight, with the EMA,
    the optimizers' moments, the LR schedule and the loss history all carried through the checkpoint."""
    x = data()

    def run(model: nn.Module, steps: int, state) -> object:
        return fit(model, x, batch_size=8, lr=1e-3, budget=Budget(steps=steps), seed=3, state=state, log_every=1)

    def schedule(step: int) -> float:
        return 1.0 / (1 + step)

    straight = tiny(family)
    straight_state = make_state(straight, 1e-3, ema=True, lr_lambda=schedule)
    expected = run(straight, 6, straight_state)

    first = tiny(family)
    state = make_state(first, 1e-3, ema=True, lr_lambda=schedule)
    run(first, 3, state)
    folder = save_checkpoint(tmp_path, first, state, config={"family": family})
    assert folder == tmp_path / "checkpoint-3"
    assert (folder / "manifest.json").is_file() and not list(folder.glob("*.pt"))  # safetensors + JSON only

    resumed = tiny(family, seed=1)  # other weights, overwritten by the checkpoint
    state = make_state(resumed, 1e-3, ema=True, lr_lambda=schedule)
    assert load_checkpoint(folder, resumed, state) == {"family": family}
    assert state.step == 3 and state.schedulers[0].last_epoch == 3
    result = run(resumed, 6, state)
    assert result.steps == 6 and result.losses == expected.losses
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b), name  # EMA weights (fit ends with them), buffers and the GAN's own EMA alike
    for model, model_state in ((straight, straight_state), (resumed, state)):  # the live weights match too
        model_state.ema.restore([p for p in model.parameters() if p.requires_grad])
    for a, b in zip(straight.parameters(), resumed.parameters(), strict=True):
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
    command = [sys.executable, "-m", "difftune.baselines.train", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_cli_trains_checkpoints_resumes_and_saves(tmp_path):
    common = ["--family", "vae", "--shapes", "--n_per_class", "2", "--resolution", "8", "--max_train_steps", "4",
              "--checkpointing_steps", "2", "--sample_every", "2", "--batch_size", "8",
              "--set", "hidden=8"]  # fmt: skip
    run = run_cli(*common, "--output_dir", str(tmp_path / "a"))
    assert run.returncode == 0, run.stderr
    out = tmp_path / "a"
    assert (out / "checkpoint-2" / "manifest.json").is_file() and (out / "checkpoint-4" / "manifest.json").is_file()
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
        "error: --family flow: unknown (did you mean 'glow'?); choose one of vae, gan, pixelcnn, glow, ddpm"
    ]
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max_train", "2"], "unknown flag --max_train; did you mean --max_train_steps?"),  # no abbreviations
        (
            ["--max_train_steps", "2", "--learning_rte", "1"],
            "unknown flag --learning_rte; did you mean --learning_rate?",
        ),
        (
            ["--max_train_steps", "2", "--mixed_precision", "fp61"],
            "--mixed_precision fp61: unknown (did you mean 'fp16'?)",
        ),
        (["--max_train_steps", "two"], "--max_train_steps must be an integer, got 'two'"),
        (["--max_train_steps", "2", "--train_data_dir", "x"], "exactly one data source"),
        (["--max_train_steps", "2", "--set", "hiden=8"], "vae: unknown option 'hiden'"),
        (["--max_train_steps", "2", "--set", "hidden=8", "--set", "beta=big"], "vae: option beta must be a number"),
        (["--max_train_steps", "0"], "--max_train_steps must be at least 1"),
        ([], "--max_train_steps is required"),
    ],
)
def test_cli_errors_are_one_line_before_training(tmp_path, capsys, extra, message):
    argv = ["--family", "vae", "--shapes", "--output_dir", str(tmp_path / "out"), *extra]
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "out").exists()


def test_repeated_set_flags_add_up_and_a_yaml_config_fills_the_rest(tmp_path):
    config = tmp_path / "train.yaml"
    config.write_text("family: gan\nshapes: true\nmax_train_steps: 3\nlearning_rate: 1e-3\n")
    cfg = parse_args(["--config", str(config), "--output_dir", "o", "--set", "hidden=8", "--set", "loss=wgan-gp"])
    assert (cfg.family, cfg.max_train_steps, cfg.learning_rate) == ("gan", 3, 1e-3)
    assert cfg.overrides() == {"hidden": 8, "loss": "wgan-gp"}


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    common = ["--family", "vae", "--shapes", "--n_per_class", "1", "--resolution", "8", "--max_train_steps", "2",
              "--batch_size", "4", "--set", "hidden=8", "--output_dir", str(tmp_path)]  # fmt: skip
    main(common)
    with pytest.raises(UserError, match="trained with --n_bits 8, this run asks for 5"):
        main([*common, "--n_bits", "5", "--resume_from_checkpoint", "latest"])
