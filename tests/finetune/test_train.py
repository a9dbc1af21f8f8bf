"""The training spine as users run it: scripts under accelerate, resume, cache, saved results, bad input."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from difftune.core.config import from_values
from difftune.finetune.config import FullTrainConfig, LoraTrainConfig, TrainConfig
from difftune.finetune.loop import train
from difftune.finetune.objective import Objective, diffusion_loss
from difftune.finetune.tasks import FULL, LORA
from difftune.toyworld.tiny import build_pipeline
from difftune.toyworld.tiny_parts import sd_scheduler

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def config(model, data, out, cls=LoraTrainConfig, **kw) -> TrainConfig:
    base = dict(
        pretrained_model_name_or_path=str(model), train_data_dir=str(data), output_dir=str(out), resolution=64,
        center_crop=True, train_batch_size=4, max_train_steps=6, checkpointing_steps=2, learning_rate=1e-3,
        report_to="none", seed=3,
    )  # fmt: skip
    base.update(kw)
    return from_values(cls, base)


def run(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def launch(script: str, *args: str) -> subprocess.CompletedProcess:
    """`accelerate launch` on one CPU process, as a user would run the script."""
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no"]  # fmt: skip
    return run([*accelerate, script, *args])


def test_loss_falls_on_a_fixed_batch():
    torch.manual_seed(0)
    unet = build_pipeline("test").unet
    scheduler = sd_scheduler()
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(scheduler.config)
    latents, hidden = torch.randn(4, 4, 16, 16), torch.randn(4, 16, 16)
    seeds = torch.arange(4)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    losses = []
    for _ in range(30):
        loss = diffusion_loss(lambda x, t: unet(x, t, hidden).sample, scheduler, latents, seeds, Objective()).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_lora_script_under_accelerate_launch_saves_a_loadable_adapter(tiny_sd1, shapes_dir, tmp_path):
    out = tmp_path / "lora"
    proc = launch(
        "finetune/finetune_lora.py", "--pretrained_model_name_or_path", str(tiny_sd1), "--train_data_dir", str(shapes_dir),
        "--output_dir", str(out), "--resolution", "64", "--max_train_steps", "4", "--checkpointing_steps", "2",
        "--train_batch_size", "4", "--learning_rate", "1e-2", "--rank", "4", "--lora_alpha", "8",
        "--validation_prompt", "a red circle", "--validation_steps", "4", "--num_validation_images", "1",
        "--validation_inference_steps", "2",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    card = (out / "README.md").read_text()  # a local base: named by its folder, never by its absolute path
    assert card.startswith("---\n") and "base_model:" not in card and str(tiny_sd1) not in card
    assert f"# LoRA fine-tune of {tiny_sd1.name}" in card
    assert (out / "validation" / "step-4" / "grid.png").exists()
    assert any((out / "logs").rglob("events.out.tfevents*"))

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None)
    kwargs = dict(num_inference_steps=2, height=64, width=64, output_type="np")
    base = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    pipe.load_lora_weights(out, adapter_name="purple")
    adapted = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(adapted - base).max() > 1e-3
    pipe.set_adapters(["purple"], adapter_weights=[0.0])
    off = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert abs(off - base).max() < 1e-5


def test_full_script_under_accelerate_launch_saves_a_pipeline(tiny_sd1, shapes_dir, tmp_path):
    out = tmp_path / "full"
    proc = launch(
        "finetune/finetune_full.py", "--pretrained_model_name_or_path", str(tiny_sd1), "--train_data_dir", str(shapes_dir),
        "--output_dir", str(out), "--resolution", "64", "--max_train_steps", "3", "--train_batch_size", "4",
        "--use_ema", "--report_to", "none",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    trained = StableDiffusionPipeline.from_pretrained(out, safety_checker=None)
    original = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None)
    diff = [
        (a - b).abs().max().item() for a, b in zip(trained.unet.parameters(), original.unet.parameters(), strict=True)
    ]
    assert max(diff) > 0


def test_resume_continues_exactly(tiny_sd1, shapes_dir, tmp_path):
    straight = train(config(tiny_sd1, shapes_dir, tmp_path / "a"), LORA)
    train(config(tiny_sd1, shapes_dir, tmp_path / "b", max_train_steps=3, checkpointing_steps=3), LORA)
    resumed = train(config(tiny_sd1, shapes_dir, tmp_path / "b", resume_from_checkpoint="latest"), LORA)
    assert straight.global_step == resumed.global_step == 6
    assert resumed.losses == straight.losses[3:]
    a = load_file(tmp_path / "a" / "checkpoint-6" / "model.safetensors")
    b = load_file(tmp_path / "b" / "checkpoint-6" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_total_limit_keeps_the_newest(tiny_sd1, shapes_dir, tmp_path):
    train(config(tiny_sd1, shapes_dir, tmp_path, cls=FullTrainConfig, checkpoints_total_limit=2), FULL)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert not list(tmp_path.glob("*.tmp"))


def test_cache_gives_the_same_losses_and_is_reused(tiny_sd1, shapes_dir, tmp_path, caplog):
    cache = tmp_path / "cache"
    cached = train(config(tiny_sd1, shapes_dir, tmp_path / "a", max_train_steps=3, cache_dir=str(cache)), LORA)
    uncached = train(config(tiny_sd1, shapes_dir, tmp_path / "b", max_train_steps=3, cache_latents=False), LORA)
    assert cached.cached and not uncached.cached
    assert cached.losses == pytest.approx(uncached.losses, rel=1e-4)
    files = sorted((cache / "latents").iterdir())
    stamps = [f.stat().st_mtime_ns for f in files]
    caplog.set_level("INFO")
    train(config(tiny_sd1, shapes_dir, tmp_path / "c", max_train_steps=1, cache_dir=str(cache)), LORA)
    assert "12 reused, 0 encoded" in caplog.text
    assert [f.stat().st_mtime_ns for f in sorted((cache / "latents").iterdir())] == stamps


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--train_data_dir", "{empty}"], "holds no images"),
        (["--train_data_dir", "{data}", "--pretrained_model_name_or_path", "{missing}"], "not found"),
        (["--train_data_dir", "{data}", "--caption_column", "prompt"], "no caption column 'prompt'"),
        (["--train_data_dir", "{data}", "--config", "{missing}"], "no such file"),
    ],
)
def test_bad_input_is_one_clear_line(tiny_sd1, shapes_dir, tmp_path, capsys, flags, message):
    from difftune.core.errors import run_main
    from difftune.finetune.finetune_lora import main

    (tmp_path / "empty").mkdir()
    subs = {"{empty}": str(tmp_path / "empty"), "{data}": str(shapes_dir), "{missing}": str(tmp_path / "nope")}
    args = ["--pretrained_model_name_or_path", str(tiny_sd1), "--output_dir", str(tmp_path / "out"),
            "--resolution", "64", *[subs.get(f, f) for f in flags]]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, args)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_bad_input_from_the_command_line(tmp_path):
    """The same guard as users meet it: exit code 2, one line on stderr, no traceback."""
    proc = run([sys.executable, "finetune/finetune_lora.py", "--pretrained_model_name_or_path", "m",
                "--train_data_dir", str(tmp_path / "nope")])  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == f"error: --train_data_dir {tmp_path / 'nope'} is not a folder"


def test_every_epoch_draws_new_noise_and_order(tiny_sd1, tmp_path, monkeypatch):
    """Each epoch reseeds every sample's noise, timestep and augmentation from (seed, epoch, index). accelerate calls
    `set_epoch(0)` on a fresh loader's dataset and batch sampler; ours must not listen (they once did, and every
    epoch replayed epoch 0)."""
    from difftune.finetune import loop
    from difftune.toyworld import shapes

    data = tmp_path / "two"
    shapes.write_dataset(data, ("red",), ("circle", "square"), per_class=1, seed=0)
    seen = []
    real = loop.batch_loss
    monkeypatch.setattr(
        loop, "batch_loss", lambda f, m, batch, *a: seen.append(batch["noise_seed"].tolist()) or real(f, m, batch, *a)
    )
    train(config(tiny_sd1, data, tmp_path / "out", train_batch_size=2, max_train_steps=4), LORA)
    assert len(seen) == 4 and len({tuple(s) for s in seen}) == 4  # one batch per epoch, four different draws
