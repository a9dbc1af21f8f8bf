"""EMA for adapters: `--use_ema` on LoRA/DoRA/LoHa/LoKr keeps an EMA of the adapter weights only, saves
it as the output with the raw weights beside it under raw/, and resumes exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from difftune.core import checkpoint as ckpt
from difftune.core.config import from_values
from difftune.finetune.config import LoraTrainConfig
from difftune.finetune.loop import RAW, train
from difftune.finetune.tasks import LORA

OUTPUT = {"lora": "pytorch_lora_weights.safetensors", "dora": "pytorch_lora_weights.safetensors",
          "loha": "unet/adapter_model.safetensors", "lokr": "unet/adapter_model.safetensors"}  # fmt: skip


def config(model, data, out, **kw) -> LoraTrainConfig:
    base = dict(
        pretrained_model_name_or_path=str(model), train_data_dir=str(data), output_dir=str(out), resolution=32,
        center_crop=True, train_batch_size=4, max_train_steps=4, checkpointing_steps=2, learning_rate=1e-2,
        report_to="none", seed=3, use_ema=True, ema_decay=0.9,
    )  # fmt: skip
    base.update(kw)
    if not base["use_ema"]:
        del base["ema_decay"]  # --ema_decay without --use_ema is refused
    return from_values(LoraTrainConfig, base)


def tensors(path) -> dict[str, torch.Tensor]:
    return load_file(path)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("adapter", ["lora", "dora", "loha", "lokr"])
def test_the_output_is_the_ema_and_the_raw_weights_lie_beside_it(tiny_sd1, shapes_dir, tmp_path, adapter):
    ema = train(config(tiny_sd1, shapes_dir, tmp_path / "ema", adapter=adapter), LORA)
    plain = train(config(tiny_sd1, shapes_dir, tmp_path / "plain", adapter=adapter, use_ema=False), LORA)
    assert ema.losses == plain.losses  # the EMA only watches: training itself is unchanged
    output, raw = tensors(tmp_path / "ema" / OUTPUT[adapter]), tensors(tmp_path / "ema" / RAW / OUTPUT[adapter])
    assert same(raw, tensors(tmp_path / "plain" / OUTPUT[adapter]))  # raw/ holds the last step's own weights
    assert output.keys() == raw.keys() and not same(output, raw)
    assert not (tmp_path / "plain" / RAW).exists()


def test_the_ema_covers_the_adapter_parameters_only(tiny_sd1, shapes_dir, tmp_path):
    train(config(tiny_sd1, shapes_dir, tmp_path), LORA)
    shadow = ckpt.load_tree(tmp_path / "checkpoint-4", "extra")["ema"]["shadow_params"]
    trained = load_file(tmp_path / "checkpoint-4" / "model.safetensors")  # the trainable parameters, by name
    assert all("lora" in k for k in trained)
    assert sorted(tuple(t.shape) for t in shadow) == sorted(tuple(t.shape) for t in trained.values())


def test_ema_resume_is_bit_identical(tiny_sd1, shapes_dir, tmp_path):
    straight = train(config(tiny_sd1, shapes_dir, tmp_path / "a", max_train_steps=6), LORA)
    train(config(tiny_sd1, shapes_dir, tmp_path / "b", max_train_steps=3, checkpointing_steps=3), LORA)
    resumed = train(config(tiny_sd1, shapes_dir, tmp_path / "b", max_train_steps=6, resume_from_checkpoint="latest"),
                    LORA)  # fmt: skip
    assert resumed.losses == straight.losses[3:]
    for name in (OUTPUT["lora"], f"{RAW}/{OUTPUT['lora']}"):
        assert same(tensors(tmp_path / "a" / name), tensors(tmp_path / "b" / name)), name
