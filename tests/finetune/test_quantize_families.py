"""`--quantize_base nf4|int8` for every family: the wiring up to diffusers' `from_pretrained` (the quantised layers
themselves need CUDA and bitsandbytes; `with_cuda` stands in for both), and the one-line refusals."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

from difftune.core.config import compose, from_values
from difftune.core.errors import UserError
from difftune.finetune import quantize
from difftune.finetune.config import LoraTrainConfig
from difftune.finetune.tasks import LORA
from difftune.pipelines.families import FAMILIES, detect, read_model_index


def pipeline_folder(tmp_path, family) -> tuple[str, type]:
    """A pipeline folder with only what detection reads; the denoiser class is the one the family's diffusers
    pipeline declares for it."""
    denoiser_class = inspect.signature(family.pipeline_class().__init__).parameters[family.denoiser_name].annotation
    folder = tmp_path / family.name
    (folder / "scheduler").mkdir(parents=True)
    (folder / "scheduler" / "scheduler_config.json").write_text("{}")
    (folder / family.denoiser_name).mkdir()
    (folder / family.denoiser_name / "config.json").write_text(json.dumps(
        {"cross_attention_dim": 1024 if family.name == "sd2" else 768}
    ))  # fmt: skip
    index = {"_class_name": family.pipeline_class_name, family.denoiser_name: ["diffusers", denoiser_class.__name__]}
    (folder / "model_index.json").write_text(json.dumps(index))
    return str(folder), denoiser_class


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_every_family_loads_its_denoiser_through_the_bitsandbytes_config(family, mode, tmp_path, with_cuda,
                                                                          monkeypatch):  # fmt: skip
    model, denoiser_class = pipeline_folder(tmp_path, family)
    assert detect(model, read_model_index(model)) is family
    calls = []
    monkeypatch.setattr(quantize, "quantization_config", lambda mode, dtype: ("bnb", mode, dtype))
    monkeypatch.setattr(denoiser_class, "from_pretrained",
                        lambda name, **kwargs: calls.append((name, kwargs)) or torch.nn.Linear(2, 2))  # fmt: skip
    cfg = compose(LoraTrainConfig, dict(pretrained_model_name_or_path=model, quantize_base=mode))
    denoiser = LORA.load_denoiser(family, cfg, torch.bfloat16)
    ((name, kwargs),) = calls
    assert name == model and kwargs["subfolder"] == family.denoiser_name
    assert kwargs["quantization_config"] == ("bnb", mode, torch.bfloat16) and kwargs["torch_dtype"] == torch.bfloat16
    assert not any(p.requires_grad for p in denoiser.parameters())  # frozen: only the adapter trains


def test_without_cuda_it_is_one_line_before_loading(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UserError, match="--quantize_base int8 needs a CUDA GPU"):
        from_values(LoraTrainConfig, dict(pretrained_model_name_or_path="m", train_data_dir="d", quantize_base="int8"))


def test_quantised_bases_do_not_swap_blocks(with_cuda):
    with pytest.raises(UserError, match="--blocks_to_swap cannot move bitsandbytes' packed weights"):
        from_values(LoraTrainConfig, dict(pretrained_model_name_or_path="m", train_data_dir="d", quantize_base="nf4",
                                          blocks_to_swap=2, gradient_checkpointing=True))  # fmt: skip
