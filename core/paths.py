"""Output folders checked before any model loads: every entry point that writes a folder asks the same question.

Writability is tried, not guessed from permission bits (root, read-only mounts and ACLs make them misleading).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from difftune.core.errors import UserError


def check_output_dir(output_dir: str, flag: str = "--output_dir") -> None:
    """A `UserError` unless `output_dir` is a folder we can create or write into."""
    path = Path(output_dir)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        what = "is a file" if existing == path else f"is inside {existing}, which is a file"
        raise UserError(f"{flag} {output_dir} {what}; give a folder")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as err:
        raise UserError(f"{flag} {output_dir}: cannot write into {existing} ({err.strerror})") from None


def _package_dir(package: str) -> Path:
    """The folder of one of difftune's packages, installed or in a checkout (the same code finds both)."""
    import importlib

    return Path(importlib.import_module(package).__file__).parent


def embedded_base(name: str) -> Path:
    """An embedded tiny base shipped as package data (`tiny_shapes`, `tiny_flow_shapes`, `tiny_edit_shapes`)."""
    return _package_dir("difftune.pipelines") / name


def shipped_configs() -> Path:
    """The folder of the YAML configs shipped with the package (`configs/` in a checkout)."""
    return _package_dir("difftune.configs")


def shipped_config(name: str) -> Path | None:
    """A shipped config named like `gpu-8gb`, `hardware/gpu-8gb.yaml` or `configs/hardware/gpu-8gb.yaml`; None when
    no shipped file has that name. Lets `--config gpu-8gb` work wherever the package is installed."""
    root = shipped_configs()
    stem = name.removeprefix("configs/")
    for candidate in (stem, f"{stem}.yaml", f"hardware/{stem}", f"hardware/{stem}.yaml"):
        path = root / candidate
        if path.is_file():
            return path
    return None
