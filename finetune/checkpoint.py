"""Resumable checkpoints in safetensors + JSON, written atomically, pruned only after the new one is complete.

accelerate's `save_state` pickles the optimizer, scheduler and RNG states (torch.save); difftune writes nothing
that needs pickle to read, so a checkpoint is: `trainable.safetensors` (the trained parameters only),
`optimizer.safetensors` + `optimizer.json`, `extra.safetensors` (EMA weights, RNG state), and `state.json`
(step, epoch, position inside the epoch, LR scheduler). A checkpoint is written to `checkpoint-N.tmp` and
renamed into place, so a crash mid-save never leaves a half-written `checkpoint-N`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from core.errors import UserError

PREFIX = "checkpoint-"


@dataclass
class TrainerState:
    global_step: int = 0
    epoch: int = 0
    batches_done_in_epoch: int = 0  # dataloader batches of `epoch` already consumed


def _split_tensors(tree, prefix: str, tensors: dict) -> object:
    """Replaces every tensor in a nested structure by a reference into `tensors`."""
    if isinstance(tree, torch.Tensor):
        tensors[prefix] = tree.detach().cpu().contiguous()
        return {"__tensor__": prefix}
    if isinstance(tree, dict):
        return {str(k): _split_tensors(v, f"{prefix}.{k}", tensors) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [_split_tensors(v, f"{prefix}.{i}", tensors) for i, v in enumerate(tree)]
    return tree


def _join_tensors(tree, tensors: dict):
    if isinstance(tree, dict) and set(tree) == {"__tensor__"}:
        return tensors[tree["__tensor__"]]
    if isinstance(tree, dict):
        return {k: _join_tensors(v, tensors) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_join_tensors(v, tensors) for v in tree]
    return tree


def save_tree(tree, folder: Path, name: str) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split_tensors(tree, name, tensors)
    save_file(tensors, folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps(skeleton))


def load_tree(folder: Path, name: str):
    tensors = load_file(folder / f"{name}.safetensors")
    return _join_tensors(json.loads((folder / f"{name}.json").read_text()), tensors)


def _int_keys(state: dict) -> dict:
    """Optimizer state dicts key parameters by int; JSON made them strings."""
    state = dict(state)
    state["state"] = {int(k): v for k, v in state["state"].items()}
    return state


def trainable_state(models: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {
        f"{name}.{pname}": p.detach().cpu().contiguous()
        for name, model in models.items()
        for pname, p in model.named_parameters()
        if p.requires_grad
    }


def save_checkpoint(
    output_dir: Path,
    state: TrainerState,
    models: dict[str, torch.nn.Module],
    optimizer,
    lr_scheduler,
    ema=None,
    total_limit: int | None = None,
) -> Path:
    final = output_dir / f"{PREFIX}{state.global_step}"
    tmp = output_dir / f"{PREFIX}{state.global_step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(trainable_state(models), tmp / "trainable.safetensors")
    save_tree(optimizer.state_dict(), tmp, "optimizer")
    extra = {"torch_rng": torch.get_rng_state()}
    if ema is not None:
        extra["ema"] = ema.state_dict()
    save_tree(extra, tmp, "extra")
    (tmp / "state.json").write_text(
        json.dumps({**state.__dict__, "lr_scheduler": lr_scheduler.state_dict()}, indent=2, default=str)
    )
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if total_limit is not None:
        for old in list_checkpoints(output_dir)[:-total_limit]:
            shutil.rmtree(old)
    return final


def list_checkpoints(output_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (temporary folders of interrupted saves are ignored)."""
    found = [p for p in output_dir.glob(f"{PREFIX}*") if p.is_dir() and p.name[len(PREFIX) :].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX) :]))


def resolve(resume: str, output_dir: Path) -> Path | None:
    """The checkpoint folder `--resume_from_checkpoint` names; None for 'latest' when there is none yet."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "state.json").exists():
        raise UserError(f"--resume_from_checkpoint {resume}: not a difftune checkpoint folder (no state.json)")
    return path


def load_checkpoint(
    folder: Path, models: dict[str, torch.nn.Module], optimizer, lr_scheduler, ema=None
) -> TrainerState:
    saved = load_file(folder / "trainable.safetensors")
    expected = trainable_state(models)
    missing = sorted(set(expected) - set(saved))
    if missing:
        raise UserError(
            f"{folder}: the checkpoint lacks {len(missing)} trained parameters (first: {missing[0]}); "
            "it was made with other adapter or training settings"
        )
    params = {f"{n}.{pn}": p for n, m in models.items() for pn, p in m.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for key, p in params.items():
            p.copy_(saved[key].to(p))
    optimizer.load_state_dict(_int_keys(load_tree(folder, "optimizer")))
    extra = load_tree(folder, "extra")
    torch.set_rng_state(extra["torch_rng"])
    if ema is not None:
        ema.load_state_dict(extra["ema"])
    info = json.loads((folder / "state.json").read_text())
    lr_scheduler.load_state_dict(info.pop("lr_scheduler"))
    return TrainerState(**info)
