"""Validation loss on held-out images, best-checkpoint selection, early stopping, and their resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from difftune.core.config import from_values
from difftune.core.errors import UserError
from difftune.finetune.config import LoraTrainConfig
from difftune.finetune.data import read_images
from difftune.finetune.loop import train
from difftune.finetune.tasks import LORA
from difftune.finetune.validation_loss import Selection, split_validation
from difftune.toyworld import shapes
from difftune.toyworld.tiny import save_tiny_pipeline


def config(model, data, out, **kw) -> LoraTrainConfig:
    base = dict(
        pretrained_model_name_or_path=str(model), train_data_dir=str(data), output_dir=str(out), resolution=32,
        center_crop=True, train_batch_size=4, max_train_steps=4, checkpointing_steps=2, learning_rate=1e-2,
        report_to="none", seed=3, validation_split=0.25, validation_steps=1,
    )  # fmt: skip
    base.update(kw)
    return from_values(LoraTrainConfig, base)


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("flow") / "sd3", size="test", family="sd3")


def test_split_is_disjoint_seeded_and_complete(shapes_dir):
    cfg = config("m", shapes_dir, "o")
    data = read_images(cfg.data)
    train_part, held = split_validation(cfg.selection, cfg.data, cfg.training.seed, data)
    names = lambda d: [r.name for r in d.records]  # noqa: E731
    assert len(held.images) == 3 and len(train_part.images) == 9  # 25% of 12
    assert sorted(names(train_part) + names(held)) == sorted(names(data)) and not set(names(held)) & set(
        names(train_part)
    )
    assert names(split_validation(cfg.selection, cfg.data, cfg.training.seed, data)[1]) == names(
        held
    )  # the same seed holds out the same images
    other = config("m", shapes_dir, "o", seed=4)
    assert names(split_validation(other.selection, other.data, other.training.seed, data)[1]) != names(held)


@pytest.mark.parametrize("family", ["sd1", "sd3"])
def test_validation_loss_differs_only_by_the_weights(tiny_sd1, sd3, shapes_dir, tmp_path, family):
    """Weights that do not move (a vanishing LR) give the same validation loss at every evaluation, to the bit: the
    noise, timesteps and latent samples are fixed per image. Weights that move change it."""
    model = {"sd1": tiny_sd1, "sd3": sd3}[family]
    extra = {"max_sequence_length": 16} if family == "sd3" else {}
    frozen = train(config(model, shapes_dir, tmp_path / "a", learning_rate=1e-30, **extra), LORA)
    values = [v for _, v in frozen.validation_losses]
    assert [s for s, _ in frozen.validation_losses] == [1, 2, 3, 4]
    assert len(set(values)) == 1 and values[0] > 0
    moving = train(config(model, shapes_dir, tmp_path / "b", **extra), LORA)
    assert len({v for _, v in moving.validation_losses}) == 4
    uncached = train(config(model, shapes_dir, tmp_path / "c", cache_latents=False, **extra), LORA)
    assert [v for _, v in uncached.validation_losses] == pytest.approx(
        [v for _, v in moving.validation_losses], rel=1e-4
    )


def test_validation_data_dir_is_read_like_the_training_folder(tiny_sd1, shapes_dir, tmp_path):
    held = tmp_path / "held"
    shapes.write_dataset(held, ("green",), shapes.SHAPES, per_class=1, seed=5)
    result = train(config(tiny_sd1, shapes_dir, tmp_path / "o", validation_split=0.0, validation_data_dir=str(held),
                          keep_best_by="validation_loss", max_train_steps=2), LORA)  # fmt: skip
    assert len(result.validation_losses) == 2
    assert json.loads((tmp_path / "o" / "best" / "best.json").read_text())["held_out_images"] == 3
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="--validation_data_dir .*empty holds no images"):
        train(config(tiny_sd1, shapes_dir, tmp_path / "p", validation_split=0.0,
                     validation_data_dir=str(tmp_path / "empty")), LORA)  # fmt: skip


def test_selection_keeps_the_lowest_and_counts_patience():
    sel = Selection()
    assert sel.update(10, 1.0) and sel.update(20, 0.5)
    assert not sel.update(30, 0.5) and not sel.update(40, 0.7)  # equal is not better
    assert (sel.best_step, sel.best_value, sel.evals_since_best) == (20, 0.5, 2)
    assert sel.patience_ran_out(2) and not sel.patience_ran_out(3) and not sel.patience_ran_out(None)


def test_early_stopping_saves_the_best_as_the_output(tiny_sd1, shapes_dir, tmp_path):
    """A learning rate far too high makes the validation loss rise; patience 2 stops two evaluations after the best,
    and the saved LoRA is the best checkpoint's weights, not the last step's."""
    out = tmp_path / "o"
    result = train(config(tiny_sd1, shapes_dir, out, learning_rate=0.3, max_train_steps=30, checkpointing_steps=100,
                          keep_best_by="validation_loss", early_stopping_patience=2), LORA)  # fmt: skip
    best = json.loads((out / "best" / "best.json").read_text())
    losses = dict(result.validation_losses)
    assert best["validation_loss"] == min(losses.values()) and losses[best["step"]] == best["validation_loss"]
    assert result.global_step == best["step"] + 2 < 30  # stopped early
    assert (out / f"checkpoint-{result.global_step}").is_dir()  # the step it stopped at is resumable
    best_weights = load_file(out / "best" / "model.safetensors")
    last_weights = load_file(out / f"checkpoint-{result.global_step}" / "model.safetensors")
    output = load_file(out / "pytorch_lora_weights.safetensors")
    key = next(k for k in best_weights if "lora_B" in k)
    flat = [v for k, v in output.items() if "lora_B" in k or "lora.up" in k]
    assert any(torch.equal(v.flatten(), best_weights[key].flatten()) for v in flat)
    assert not any(torch.equal(v.flatten(), last_weights[key].flatten()) for v in flat)


def test_resume_keeps_the_best_so_far(tiny_sd1, shapes_dir, tmp_path):
    kw = dict(learning_rate=0.3, keep_best_by="validation_loss", early_stopping_patience=3, max_train_steps=8)
    straight = train(config(tiny_sd1, shapes_dir, tmp_path / "a", **kw), LORA)
    train(config(tiny_sd1, shapes_dir, tmp_path / "b", **{**kw, "max_train_steps": 4}), LORA)
    resumed = train(config(tiny_sd1, shapes_dir, tmp_path / "b", resume_from_checkpoint="latest", **kw), LORA)
    assert resumed.validation_losses == [x for x in straight.validation_losses if x[0] > 4]
    assert resumed.global_step == straight.global_step
    a, b = (json.loads((tmp_path / d / "best" / "best.json").read_text()) for d in ("a", "b"))
    assert a == b  # the same best step and value as one uninterrupted run
    wa, wb = (load_file(tmp_path / d / "best" / "model.safetensors") for d in ("a", "b"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"validation_split": 1.0}, "--validation_split 1.0 must be within [0, 1)"),
        ({"validation_data_dir": "x"}, "not both"),
        ({"validation_split": 0.0, "keep_best_by": "validation_loss"}, "needs held-out images"),
        ({"keep_best_by": "validation_loss", "early_stopping_patience": 0}, "must be at least 1"),
        ({"early_stopping_patience": 2}, "add --keep_best_by validation_loss"),
        ({"validation_split": 0.01}, "holds out 0"),
    ],
)
def test_bad_settings_are_one_line(tiny_sd1, shapes_dir, tmp_path, settings, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace(")", r"\)")):
        cfg = config(tiny_sd1, shapes_dir, tmp_path, **settings)
        cfg.validate()
        train(cfg, LORA)


def test_keep_best_by_is_strict_on_the_command_line():
    from difftune.core.config import parse

    with pytest.raises(UserError, match="--keep_best_by"):
        parse(LoraTrainConfig, ["--train_data_dir", "d", "--keep_best_by", "train_loss"], prog="finetune_lora.py")
