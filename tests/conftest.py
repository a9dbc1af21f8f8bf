"""Shared fixtures: tiny pipelines and shapes data built locally, once per test session. No network."""

from __future__ import annotations

import os
import warnings

import pytest

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
    from toyworld.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd1", size="test", family="sd1")


@pytest.fixture(scope="session")
def shapes_dir(tmp_path_factory):
    from toyworld import shapes

    out = tmp_path_factory.mktemp("shapes") / "data"
    shapes.write_dataset(out, ("red", "blue"), shapes.SHAPES, per_class=2, seed=0)
    return out
