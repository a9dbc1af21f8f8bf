"""Resume that refuses what it cannot honour: the checkpoint's stored run compared with this one, before loading.

A checkpoint stores the resolved config it was trained with (secrets left out), the number of processes and a
fingerprint of the training data (`run_record`). On `--resume_from_checkpoint` each setting is of the kind its
field metadata declares (`resume=` in `core.config.option`; `resume_kinds`):
- `passive`: settings that never touch the weights (where things are written, logging, validation, checkpoint
  cadence, Hub upload): a change is taken as it is;
- `settable`: settings that shape training from here on and can be honoured exactly (learning rate and its
  schedule, optimizer hyper-parameters, clipping, the step budget): a change is applied to the optimizer and the
  LR schedule after loading (`apply_settings`) and logged, because the checkpoint's optimizer state would
  otherwise silently bring the old values back;
- `refused`: everything else changes the training trajectory (batch size, accumulation, processes, data, model,
  adapter and its targets, objective, augmentation, seed): a change is one error naming every difference, unless
  `--resume_allow_changes`. Then the changes are logged and, when the batch layout or the data changed
  (`refused_restarts_epoch`), the
  interrupted epoch restarts from its first batch (the in-epoch position was counted in the old batches and
  cannot be mapped onto new ones: the samples of that epoch already seen are seen again, none is skipped).

Settings that decide the shape of the trained weights (rank, adapter, targets, model) cannot be changed even then:
loading fails with one line naming the first tensor that does not fit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from difftune.core.config import (
    PASSIVE,
    REFUSED,
    REFUSED_RESTARTS_EPOCH,
    SETTABLE,
    leaf_fields,
    option,
    to_dict,
)
from difftune.core.errors import UserError

logger = logging.getLogger(__name__)

# What a resume may do with the record's entries that are not settings: another process count or other data
# change the trajectory and the batch layout.
RECORD_KINDS = {"num_processes": REFUSED_RESTARTS_EPOCH, "data": REFUSED_RESTARTS_EPOCH}


@dataclass
class CheckpointConfig:
    """Resumable checkpoints: how often, how many, and resuming from one."""

    checkpointing_steps: int = option("Save a resumable checkpoint every N steps.", default=500, resume=PASSIVE,
                                      card=False)  # fmt: skip
    checkpoints_total_limit: int | None = option("Keep at most N checkpoints.", default=None, resume=PASSIVE,
                                                 card=False)  # fmt: skip
    resume_from_checkpoint: str | None = option("'latest' or a checkpoint folder.", default=None, resume=PASSIVE,
                                                card=False)  # fmt: skip
    resume_allow_changes: bool = option(
        "Resume even though settings that change the training trajectory (batch size, data, ...) differ from the "
        "checkpoint's; the interrupted epoch then restarts.", default=False, resume=PASSIVE, card=False,
    )  # fmt: skip

    def validate(self) -> None:
        if self.checkpointing_steps < 1:
            raise UserError("--checkpointing_steps must be at least 1")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise UserError("--checkpoints_total_limit must be at least 1 (leave it unset to keep every checkpoint)")


def resume_kinds(config_class) -> dict[str, str]:
    """Every setting's resume kind, from its field metadata, plus the record's own entries."""
    kinds = {name: f.metadata.get("resume") or REFUSED for name, (_, f, _) in leaf_fields(config_class).items()}
    return {**kinds, **RECORD_KINDS}


# The optimizer's param-group entries that come from the config; the rest (e.g. Prodigy's running `d`) is state.
HYPERPARAMETERS = ("lr", "initial_lr", "betas", "weight_decay", "eps")


def run_record(cfg, num_processes: int, fingerprint: str, num_examples: int) -> dict:
    """What a checkpoint stores about the run that wrote it (`core.checkpoint.save`'s `config`)."""
    return {"settings": to_dict(cfg), "num_processes": num_processes,
            "data": {"fingerprint": fingerprint, "examples": num_examples}}  # fmt: skip


def _flatten(record: dict) -> dict:
    """A run record as one flat mapping: its settings, `num_processes`, and `data` (the fingerprint)."""
    return {**record["settings"], "num_processes": record["num_processes"], "data": record["data"]["fingerprint"]}


def _show(key: str, old, new, record_old: dict, record_new: dict) -> str:
    if key == "data":
        n_old, n_new = record_old["data"]["examples"], record_new["data"]["examples"]
        return f"the training data ({n_old} examples then, {n_new} now, contents differ)"
    flag = "processes" if key == "num_processes" else f"--{key}"
    return f"{flag} {old} -> {new}"


def check_resume(folder: Path, stored: dict | None, current: dict, allow_changes: bool, kinds: dict[str, str]) -> bool:
    """Compares the checkpoint's run record with this run's, before any model loads; `kinds` gives each setting's
    resume kind (`resume_kinds`). Raises one `UserError` naming every trajectory-changing difference (unless
    `allow_changes`); logs the rest. Returns whether the interrupted epoch must restart from its first batch."""
    if not stored or "settings" not in stored:
        raise UserError(
            f"--resume_from_checkpoint {folder}: its state.json holds no training settings, so it is "
            "not a checkpoint of finetune_lora.py/finetune_full.py; point at a checkpoint-N folder they wrote"
        )
    foreign = sorted(set(stored["settings"]) - set(current["settings"]))
    if foreign:
        raise UserError(
            f"--resume_from_checkpoint {folder}: written by another training script (its settings include "
            f"--{foreign[0]}, which this one has not): resume it with the script that wrote it"
        )
    old, new = _flatten(stored), _flatten(current)
    changed = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k) and kinds.get(k, REFUSED) != PASSIVE]
    guarded = [k for k in changed if kinds.get(k, REFUSED) != SETTABLE]
    shown = [_show(k, old.get(k), new.get(k), stored, current) for k in guarded]
    if guarded and not allow_changes:
        raise UserError(
            f"--resume_from_checkpoint {folder}: {', '.join(shown)} would change the training trajectory; "
            "resume with the checkpoint's settings, or pass --resume_allow_changes to accept the changes"
        )
    if guarded:
        logger.warning("resuming with changed settings (--resume_allow_changes): %s", ", ".join(shown))
    settable = [k for k in changed if kinds.get(k) == SETTABLE]
    if settable:
        logger.info(
            "resuming with new %s", ", ".join(_show(k, old.get(k), new.get(k), stored, current) for k in settable)
        )
    restart = any(kinds.get(k) == REFUSED_RESTARTS_EPOCH for k in guarded)
    if restart:
        logger.warning("the batch layout or data changed: the interrupted epoch restarts from its first batch")
    return restart


def hyperparameters(optimizer, lr_scheduler) -> tuple[list[dict], list[float]]:
    """This run's optimizer settings and the schedule's base learning rates, read before a checkpoint overwrites
    them (`torch.optim.Optimizer.load_state_dict` restores the param groups of the run that saved)."""
    groups = [{k: g[k] for k in HYPERPARAMETERS if k in g} for g in optimizer.param_groups]
    return groups, list(_torch_scheduler(lr_scheduler).base_lrs)


def apply_settings(optimizer, lr_scheduler, groups: list[dict], base_lrs: list[float]) -> None:
    """Puts this run's learning rate, schedule and optimizer settings back after loading a checkpoint: the moments
    and the schedule's position stay the checkpoint's, the settings become this run's."""
    scheduler = _torch_scheduler(lr_scheduler)
    for group, settings in zip(optimizer.param_groups, groups, strict=True):
        group.update(settings)
    scheduler.base_lrs = base_lrs
    # diffusers' schedules are LambdaLR: lr = base * factor(step); recomputed at the restored step.
    lrs = [base * factor(scheduler.last_epoch) for base, factor in zip(base_lrs, scheduler.lr_lambdas, strict=True)]
    for group, lr in zip(optimizer.param_groups, lrs, strict=True):
        group["lr"] = lr


def _torch_scheduler(lr_scheduler) -> torch.optim.lr_scheduler.LRScheduler:
    """accelerate's `AcceleratedScheduler` wraps the torch scheduler."""
    return getattr(lr_scheduler, "scheduler", lr_scheduler)
