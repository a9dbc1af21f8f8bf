"""The comparison's per-run results on disk, so that a killed comparison loses at most the run in progress.

Each finished (family, seed) run is written to `OUT/runs/`: `<family>-seed<seed>.safetensors` (its first samples,
for the grid) and then `<family>-seed<seed>.json` (every number it measured), each to a temporary file renamed into
place, so a run's JSON exists only when the run is complete. `OUT/runs/config.json` holds the settings the results
depend on (all but the output folder, the families and the seeds) and a fingerprint of the data: a rerun with the
same settings on the same images skips what is complete, a rerun with other settings or changed images (in the same
folder) is refused in one line unless `--overwrite` removes the old results. A damaged file in `OUT/runs/` is one
line naming it.
`OUT/runs/classifier.safetensors` (+ `.json`, its report) is the evaluation classifier that scored the stored runs:
a rerun scores in the same feature space instead of training it again, which need not give the same network (the
same seed on 1 thread instead of 2 reached held-out accuracy 0.889 instead of 0.828).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from difftune.core.errors import UserError
from difftune.core.files import atomic, read_json, reason

# Settings that choose which runs are made, not what a run measures: changing them keeps the completed runs.
NOT_IN_RESULTS = ("output_dir", "families", "seeds", "overwrite")
DATA_KEY = "data_fingerprint"  # beside the settings in config.json: the data the stored runs were made on
REDO = "delete it to redo what it holds, or pass --overwrite to start the comparison over"
GRID_SIZE = 64


def _atomic_write(path: Path, write) -> None:
    with atomic(path) as tmp:
        write(tmp)


class RunStore:
    """`data` is a fingerprint of the images the runs train and are scored on (`compare.data_fingerprint`): results
    are reused only for the same settings and the same data, whatever the folder is called."""

    def __init__(self, out: Path, config: dict, overwrite: bool, data: str):
        self.folder = out / "runs"
        settings = json.loads(json.dumps({k: v for k, v in config.items() if k not in NOT_IN_RESULTS}))
        settings[DATA_KEY] = data
        if overwrite and self.folder.exists():
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        stored_path = self.folder / "config.json"
        if stored_path.exists():
            stored = self._read(stored_path)
            if not isinstance(stored, dict):
                raise UserError(f"{stored_path}: not a comparison's settings; {REDO}")
            differ = [k for k in sorted(set(stored) | set(settings)) if stored.get(k) != settings.get(k)]
            if differ and differ != [DATA_KEY]:  # a setting first: it names the cause when it changes the data too
                key = next(k for k in differ if k != DATA_KEY)
                raise UserError(
                    f"{out} holds results of another comparison ({key}: {stored.get(key)!r} there, "
                    f"{settings.get(key)!r} here); pass --overwrite to replace them, or choose another --output_dir"
                )
            if differ:
                raise UserError(
                    f"{out} holds results of a comparison on other data (the images or labels differ from those "
                    "its runs were trained on); pass --overwrite to replace them, or choose another --output_dir"
                )
        else:
            _atomic_write(stored_path, lambda p: p.write_text(json.dumps(settings, indent=1)))

    @staticmethod
    def _read(path: Path) -> object:
        return read_json(path, REDO)

    def _path(self, family: str, seed: int, suffix: str) -> Path:
        return self.folder / f"{family}-seed{seed}.{suffix}"

    def done(self, family: str, seed: int) -> bool:
        return self._path(family, seed, "json").exists()

    def save(self, family: str, seed: int, record: dict, samples: torch.Tensor) -> None:
        """The samples first, the record last: the record's presence means the run is complete."""
        grid = samples[:GRID_SIZE].contiguous()
        _atomic_write(self._path(family, seed, "safetensors"), lambda p: save_file({"samples": grid}, str(p)))
        _atomic_write(self._path(family, seed, "json"), lambda p: p.write_text(json.dumps(record)))

    def load(self, family: str, seed: int) -> tuple[dict, torch.Tensor]:
        path = self._path(family, seed, "json")
        record = self._read(path)
        if not isinstance(record, dict):
            raise UserError(f"{path}: not a run's record; {REDO}")
        return record, self._tensors(self._path(family, seed, "safetensors"))["samples"]

    def load_model(self, name: str, model: nn.Module) -> dict | None:
        """Loads the stored `name` into `model` and returns its report, or None when none is stored."""
        report = self.folder / f"{name}.json"
        if not report.exists():
            return None
        weights = self.folder / f"{name}.safetensors"
        try:
            load_model(model, str(weights))
        except (SafetensorError, OSError, RuntimeError) as err:
            raise UserError(f"{weights}: unreadable ({reason(err)}); {REDO}") from None
        return self._read(report)

    @staticmethod
    def _tensors(path: Path) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise UserError(f"{path}: unreadable ({reason(err)}); {REDO}") from None

    def save_model(self, name: str, model: nn.Module, report: dict) -> None:
        """The weights first, the report last: the report's presence means the model is complete."""
        _atomic_write(self.folder / f"{name}.safetensors", lambda p: save_model(model, str(p)))
        _atomic_write(self.folder / f"{name}.json", lambda p: p.write_text(json.dumps(report)))
