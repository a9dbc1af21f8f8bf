"""core/checkpoint.py's named folders (`best/`): replaced whole, notes inside, an interrupted swap put back."""

from __future__ import annotations

import json

import torch
from torch import nn

from difftune.core import checkpoint as ck


def model(seed: int) -> dict[str, nn.Module]:
    torch.manual_seed(seed)
    return {"net": nn.Linear(3, 2)}


def test_a_named_checkpoint_is_replaced_whole_and_carries_its_notes(tmp_path):
    ck.save(tmp_path, 5, model(0), name="best", notes={"best.json": {"step": 5, "validation_loss": 0.5}})
    ck.save(tmp_path, 9, model(1), name="best", notes={"best.json": {"step": 9, "validation_loss": 0.4}})
    assert json.loads((tmp_path / "best" / "best.json").read_text()) == {"step": 9, "validation_loss": 0.4}
    assert ck.damage(tmp_path / "best") is None and not list(tmp_path.glob("best.*"))
    assert ck.list_checkpoints(tmp_path) == []  # best/ is not a checkpoint-N: pruning and `latest` ignore it
    target = model(2)
    ck.load_weights(tmp_path / "best", target)
    assert torch.equal(target["net"].weight, model(1)["net"].weight)


def test_remove_stale_puts_back_a_best_moved_aside_and_drops_half_written_ones(tmp_path):
    ck.save(tmp_path, 5, model(0), name="best")
    (tmp_path / "best").rename(tmp_path / "best.old")  # interrupted between moving the old one aside ...
    (tmp_path / "best.tmp").mkdir()  # ... and renaming the new one in
    ck.remove_stale(tmp_path)
    assert ck.damage(tmp_path / "best") is None and not (tmp_path / "best.old").exists()
    assert not (tmp_path / "best.tmp").exists()
