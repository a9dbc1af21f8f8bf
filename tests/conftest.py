"""Shared fixtures: tiny pipelines and shapes data built locally, once per test session. No network."""

from __future__ import annotations

import os
import sys
import types
import warnings

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", message=".*kernels.*")


def pytest_collection_modifyitems(items):
    """Minutes-long tests first: under `make test`'s two workers, one of them runs the long test while the other
    works through (and then shares) the rest, instead of the long test starting last on an otherwise idle machine."""
    items.sort(key=lambda item: item.get_closest_marker("long") is None)  # a stable sort keeps the rest in order


@pytest.fixture(scope="session")
def tiny_sd1(tmp_path_factory):
    from difftune.toyworld.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd1", size="test", family="sd1")


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    from difftune.toyworld import shapes

    out = tmp_path_factory.mktemp("shapes") / "data"
    shapes.write_dataset(out, ("red", "blue"), shapes.SHAPES, per_class=2, seed=0)
    return out


class StandInAdamW8bit(torch.optim.AdamW):
    """Where bitsandbytes' AdamW8bit would be: records the settings our code hands it."""


@pytest.fixture
def with_cuda(monkeypatch):
    """Pretends a CUDA machine with bitsandbytes (an optional extra, absent here) so the code past the device and
    package checks runs; nothing moves tensors to a GPU. bitsandbytes is a stand-in module whose `AdamW8bit`
    records what it is given."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    bnb = types.ModuleType("bitsandbytes")
    bnb.optim = types.SimpleNamespace(AdamW8bit=StandInAdamW8bit)
    monkeypatch.setitem(sys.modules, "bitsandbytes", bnb)
    return bnb


class TinyDenoisers:
    """Tiny denoisers (`toyworld.tiny_denoisers`) with an adapter on their attention, made non-zero so that its
    gradients are, and one step's loss and adapter gradients."""

    ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]

    @staticmethod
    def adapted(kind: str, adapter: str = "lora"):
        from difftune.finetune.adapters import AdapterConfig, adapter_config, add_adapter
        from difftune.toyworld.tiny_denoisers import BUILDERS

        torch.manual_seed(0)
        model = BUILDERS[kind]()
        add_adapter(model, adapter_config(AdapterConfig(adapter=adapter, rank=2), TinyDenoisers.ATTENTION))
        for p in model.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.1)
        return model

    @staticmethod
    def loss_and_grads(kind: str, model) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        from difftune.toyworld.tiny_denoisers import example_loss

        loss = example_loss(kind, model)
        loss.backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return loss.detach(), grads


@pytest.fixture
def denoisers():
    return TinyDenoisers
