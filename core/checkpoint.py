"""Resumable checkpoints for every trainer in the repo: safetensors + JSON, atomic, complete-or-absent.

A checkpoint `checkpoint-N/` holds
- `model.safetensors`: the weights of the trained models (only the trained parameters, or whole state dicts),
  keyed `<model name>.<parameter path>`;
- `optimizer.safetensors` + `optimizer.json`: each optimizer's *full* state, keyed by parameter path;
- `extra.safetensors` + `extra.json`: the trainer's own state (EMA weights, RNG states);
- `state.json`: progress (step, epoch, ...), LR schedulers, and the resolved config the run was trained with;
- `manifest.json`, written last: every file, its size and its sha256. A folder without a matching manifest is
  incomplete; sizes are checked wherever checkpoints are listed, checksums when a run resumes from one (a file
  damaged without changing its size is named, never loaded).

`best/` (the lowest validation loss so far, `--keep_best_by`) is the same kind of folder, replaced when a better one
comes. It is written into `checkpoint-N.tmp/` and renamed into place, so a crash mid-save never leaves a half-written
`checkpoint-N`; `--checkpoints_total_limit` prunes only after the new checkpoint is complete, and only checkpoints up to the
step just saved: a run that starts at step N first moves checkpoints saved after N aside (`set_aside_later`).

Engines. The optimizer state is read through torch's `torch.distributed.checkpoint.state_dict` API
(`get_optimizer_state_dict` with `full_state_dict=True`), which gathers the shards under FSDP and is the plain
state dict (keyed by parameter path, not by index) on one process and under DDP; every process takes part and
the main process writes. On resume every process reads the full state and `set_optimizer_state_dict` shards it
again. DeepSpeed keeps its partitioned optimizer inside its engine, which only DeepSpeed's own checkpoint format
can save: there the optimizer goes through accelerate's `save_state`/`load_state` into `engine/` (DeepSpeed's
files, its own serialisation); everything else stays as above. accelerate's `save_state` is not used otherwise
because it pickles optimizer, scheduler and RNG states, and difftune writes nothing that needs pickle to read.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from difftune.core.errors import UserError
from difftune.core.files import reason, remove, stale_temporaries

logger = logging.getLogger(__name__)

PREFIX = "checkpoint-"
WRAPPER_LEVELS = ("module", "_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module")
MANIFEST = "manifest.json"


# ----------------------------------------------------------------------------------------------- nested tensors


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
    """A nested structure of tensors and JSON values as `<name>.safetensors` + `<name>.json`."""
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split_tensors(tree, name, tensors)
    save_file(tensors, folder / f"{name}.safetensors")
    (folder / f"{name}.json").write_text(json.dumps(skeleton))


def load_tree(folder: Path, name: str):
    tensors = _load_safetensors(folder / f"{name}.safetensors")
    return _join_tensors(_load_json(folder / f"{name}.json"), tensors)


def _load_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{path}: unreadable ({str(err).splitlines()[0]}); resume from another checkpoint") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as err:
        raise UserError(f"{path}: unreadable ({str(err).splitlines()[0]}); resume from another checkpoint") from err


# ----------------------------------------------------------------------------------------------- engines


def _is_deepspeed(accelerator) -> bool:
    return accelerator is not None and accelerator.distributed_type.value == "DEEPSPEED"


def _is_fsdp(accelerator) -> bool:
    return accelerator is not None and accelerator.distributed_type.value == "FSDP"


def _root(models: dict[str, nn.Module]) -> nn.ModuleDict:
    """The models under one root, so that parameter paths read `<name>.<path>` (DDP/compile wrappers skipped)."""
    return nn.ModuleDict(models)


def _model_state(models: dict[str, nn.Module], trainable_only: bool, accelerator) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    root = _root(models)
    state = get_model_state_dict(root, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if trainable_only:
        trained = {_clean(name) for name, p in root.named_parameters() if p.requires_grad}
        state = {k: v for k, v in state.items() if k in trained}
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def _clean(name: str) -> str:
    """A parameter path without the levels wrappers add: DDP's `module.`, torch.compile's `_orig_mod.`, FSDP1's and
    activation checkpointing's wrapped-module levels (as torch's state-dict API names parameters)."""
    return ".".join(part for part in name.split(".") if part not in WRAPPER_LEVELS)


def _optimizer_states(models, optimizers, accelerator) -> list[dict]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return [get_optimizer_state_dict(_root(models), _torch_optimizer(o), options=options) for o in optimizers]


def _torch_optimizer(optimizer):
    """accelerate's `AcceleratedOptimizer` wraps the torch optimizer; torch's state-dict API wants the latter."""
    return getattr(optimizer, "optimizer", optimizer)


def _load_optimizers(models, optimizers, states, accelerator) -> None:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    # strict=False: a trained parameter that never received a gradient (e.g. SDXL's last text-encoder layer, whose
    # output the UNet never sees) has no optimizer state to restore; the weights themselves are checked in `load`.
    options = StateDictOptions(full_state_dict=_is_fsdp(accelerator), strict=False)
    for optimizer, state in zip(optimizers, states, strict=True):
        set_optimizer_state_dict(_root(models), _torch_optimizer(optimizer), state, options=options)


# ----------------------------------------------------------------------------------------------- save


def save(
    output_dir: Path,
    step: int,
    models: dict[str, nn.Module],
    optimizers: Sequence = (),
    schedulers: Sequence = (),
    progress: dict | None = None,
    extra: dict | None = None,
    config: dict | None = None,
    total_limit: int | None = None,
    trainable_only: bool = True,
    accelerator=None,
    name: str | None = None,
    notes: dict[str, dict] | None = None,
) -> Path:
    """Writes `checkpoint-{step}` (or `name`, e.g. `best`, replacing an older one) under `output_dir`, with `notes`
    as JSON files inside it (file name -> content); call it on every process (gathering is collective)."""
    output_dir = Path(output_dir)
    folder = name or f"{PREFIX}{step}"
    final, tmp = output_dir / folder, output_dir / f"{folder}.tmp"
    is_main = accelerator is None or accelerator.is_main_process
    weights = _model_state(models, trainable_only, accelerator)
    deepspeed = _is_deepspeed(accelerator)
    optimizer_states = [] if deepspeed else _optimizer_states(models, optimizers, accelerator)
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    if deepspeed:
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "engine"), safe_serialization=True)
    if is_main:
        try:
            _write(tmp, final, step, weights, optimizer_states, extra, schedulers, progress, config, notes)
        except (OSError, SafetensorError) as err:  # a full disk, a quota, a folder gone: nothing half-written stays
            shutil.rmtree(tmp, ignore_errors=True)
            last = list_checkpoints(output_dir)
            raise UserError(
                f"could not write {final.name} in {output_dir} ({reason(err)}); nothing half-written was "
                f"kept, the last complete checkpoint is {last[-1] if last else 'none'}: free space and resume with "
                "--resume_from_checkpoint latest"
            ) from None
        if total_limit is not None:
            prune(output_dir, total_limit, final)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return final


def _write(
    tmp: Path, final: Path, step, weights, optimizer_states, extra, schedulers, progress, config, notes
) -> None:
    """The main process's files into `tmp`, the manifest last, then `tmp` renamed to `final`."""
    save_file(weights, tmp / "model.safetensors")
    save_tree(optimizer_states, tmp, "optimizer")
    save_tree({**(extra or {}), "torch_rng": torch.get_rng_state()}, tmp, "extra")
    info = {"step": step, "progress": progress or {}, "schedulers": [s.state_dict() for s in schedulers],
            "config": config}  # fmt: skip
    (tmp / "state.json").write_text(json.dumps(info, indent=2, default=str))
    for file_name, content in (notes or {}).items():
        (tmp / file_name).write_text(json.dumps(content, indent=2))
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    manifest = {str(p.relative_to(tmp)): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))  # last: its presence means complete
    if final.exists():  # the same step saved again after a resume, or a better `best`
        old = final.with_name(f"{final.name}.old")
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)


# ----------------------------------------------------------------------------------------------- find, load


def _step(folder: Path) -> int | None:
    suffix = folder.name[len(PREFIX) :]
    return int(suffix) if folder.name.startswith(PREFIX) and suffix.isdigit() else None


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def damage(folder: Path, verify: bool = False) -> str | None:
    """Why `folder` is not a complete checkpoint (naming the file), or None when the manifest matches its files:
    each file's size, and with `verify` its sha256 too (a file damaged without changing its size)."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except OSError:
        return f"no {MANIFEST} (an interrupted save, or not a checkpoint)"
    except (ValueError, UnicodeDecodeError):
        return f"{MANIFEST} is not valid JSON"
    if not isinstance(manifest, dict) or not all(
        isinstance(entry, dict) and {"size", "sha256"} <= set(entry) for entry in manifest.values()
    ):
        return f"{MANIFEST} lists no size and sha256 per file (not a checkpoint of this version)"
    for name, entry in manifest.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != entry["size"]:
            return f"{name} has {path.stat().st_size} bytes, {entry['size']} when saved (truncated or overwritten)"
        if verify and _sha256(path) != entry["sha256"]:
            return f"{name} differs from the file saved (sha256 mismatch: damaged on disk or overwritten)"
    return None


def list_checkpoints(output_dir: Path, verify: bool = False) -> list[Path]:
    """Complete checkpoints, oldest first; incomplete `checkpoint-N` folders are skipped with a warning. `verify`
    checks every file's sha256 too (reading all of them), as a resume does."""
    found = sorted((p for p in Path(output_dir).glob(f"{PREFIX}*") if p.is_dir() and _step(p) is not None), key=_step)
    complete = []
    for folder in found:
        reason = damage(folder, verify)
        if reason is None:
            complete.append(folder)
        else:
            logger.warning("skipping %s: incomplete or damaged (%s)", folder, reason)
    return complete


def step_of(folder: Path) -> int:
    """The step a complete checkpoint (`checkpoint-N` or `best`) was saved at."""
    info = _load_json(Path(folder) / "state.json")
    return int(info["step"]) if isinstance(info, dict) and isinstance(info.get("step"), int) else 0


def set_aside_later(output_dir: Path, step: int) -> Path | None:
    """Moves the checkpoints of `output_dir` saved after `step` (and a `best/` saved after it) into
    `abandoned-<date>-<time>/`: a run that starts at `step` (a rewind to an earlier checkpoint, or a new run in a
    folder that holds one) must neither prune them as its own nor resume from them later, and they are another
    run's work, kept. Returns the folder they went to, or None when there were none. Main process only."""
    output_dir = Path(output_dir)
    later = [p for p in output_dir.glob(f"{PREFIX}*") if p.is_dir() and (_step(p) or 0) > step]
    best = output_dir / "best"
    if best.is_dir() and (damage(best) is not None or step_of(best) > step):
        later.append(best)
    if not later:
        return None
    aside = output_dir / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}"
    n = 1
    while aside.exists():
        n += 1
        aside = output_dir / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}-{n}"
    aside.mkdir()
    for folder in later:
        folder.rename(aside / folder.name)
    names = ", ".join(sorted(p.name for p in later))
    logger.warning("%s held checkpoints saved after step %d (%s), of a run this one does not continue: moved to %s",
                   output_dir, step, names, aside)  # fmt: skip
    return aside


def prune(output_dir: Path, keep: int, current: Path) -> None:
    """Deletes all but the newest `keep` complete checkpoints up to `current` (just saved), never `current` itself
    nor any saved after it (see `set_aside_later`)."""
    limit = _step(current)
    if limit is None:
        return
    mine = [p for p in list_checkpoints(output_dir) if _step(p) <= limit and p != current]
    for old in mine[: max(0, len(mine) - (keep - 1))]:
        shutil.rmtree(old)


def remove_stale(output_dir: Path) -> None:
    """Deletes `checkpoint-N.tmp` and `best.tmp` folders left by an interrupted save (main process, at start), and the
    temporaries of result files (`core.files.atomic`), and puts back a `best` that a save replacing it was
    interrupted while moving aside."""
    for old in (p for p in Path(output_dir).glob("*.old") if p.is_dir()):
        final = old.with_suffix("")
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.rename(final)
    for tmp in [*Path(output_dir).glob(f"{PREFIX}*.tmp"), *Path(output_dir).glob("best.tmp")]:
        logger.warning("removing %s, left by an interrupted save", tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    for tmp in stale_temporaries(Path(output_dir)):  # a result file or folder whose writer was killed
        logger.warning("removing %s, left by an interrupted save", tmp)
        remove(tmp)


def resolve(resume: str, output_dir: Path) -> Path | None:
    """The folder `--resume_from_checkpoint` names, every file checked against its manifest's size and sha256;
    None for 'latest' when there is no intact one yet. 'latest' skips a damaged checkpoint, naming the file (a
    warning); a damaged one named explicitly is an error."""
    if resume == "latest":
        found = list_checkpoints(output_dir)
        for folder in reversed(found):
            reason = damage(folder, verify=True)
            if reason is None:
                return folder
            logger.warning("skipping %s: incomplete or damaged (%s)", folder, reason)
        return None
    path = Path(resume)
    if not path.exists() and len(path.parts) == 1 and (output_dir / path).exists():
        path = output_dir / path  # a bare name is a checkpoint of --output_dir, as diffusers' scripts read it
    if not (path / "state.json").is_file():
        raise UserError(f"--resume_from_checkpoint {resume}: not a checkpoint folder (no state.json)")
    reason = damage(path, verify=True)
    if reason is not None:
        raise UserError(f"--resume_from_checkpoint {resume}: incomplete or damaged ({reason}); resume from another")
    return path


def stored_config(folder: Path) -> dict | None:
    """The run record `save` stored with the checkpoint (`config`), or None for a checkpoint without one."""
    info = _load_json(Path(folder) / "state.json")
    return info.get("config") if isinstance(info, dict) else None


def load(
    folder: Path,
    models: dict[str, nn.Module],
    optimizers: Sequence = (),
    schedulers: Sequence = (),
    trainable_only: bool = True,
    accelerator=None,
) -> dict:
    """Restores what `save` wrote into the given objects; returns {"step", "progress", "extra", "config"}."""
    folder = Path(folder)
    load_weights(folder, models, trainable_only, accelerator)
    if _is_deepspeed(accelerator):
        accelerator.load_state(str(folder / "engine"))
    else:
        _load_optimizers(models, optimizers, load_tree(folder, "optimizer"), accelerator)
    extra = load_tree(folder, "extra")
    torch.set_rng_state(extra.pop("torch_rng"))
    info = _load_json(folder / "state.json")
    for scheduler, state in zip(schedulers, info["schedulers"], strict=True):
        scheduler.load_state_dict(state)
    return {"step": info["step"], "progress": info["progress"], "extra": extra, "config": info.get("config")}


def load_weights(folder: Path, models: dict[str, nn.Module], trainable_only: bool = True, accelerator=None) -> None:
    """Restores only the model weights `save` wrote (e.g. the best checkpoint's, to export them)."""
    saved = _load_safetensors(Path(folder) / "model.safetensors")
    root = _root(models)
    if trainable_only:
        targets = {_clean(n): p for n, p in root.named_parameters() if p.requires_grad}
    else:
        targets = {_clean(n): t for n, t in root.state_dict(keep_vars=True).items()}
    missing = sorted(set(targets) - set(saved))
    if missing:
        raise UserError(
            f"{folder}: lacks {len(missing)} trained tensors (first: {missing[0]}); it was made with other "
            "adapter, model or training settings"
        )
    for key, tensor in targets.items():
        if tensor.shape != saved[key].shape:
            raise UserError(f"{folder}: {key} has shape {tuple(saved[key].shape)}, the model {tuple(tensor.shape)}")
    if _is_fsdp(accelerator):  # sharded parameters: torch scatters the full tensors to each process's shard
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        full = {key: saved[key] for key in targets}
        set_model_state_dict(root, full, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        with torch.no_grad():
            for key, tensor in targets.items():
                tensor.copy_(saved[key].to(tensor))
