"""Output folders checked before any model loads: every entry point that writes a folder asks the same question.

Writability is tried, not guessed from permission bits (root, read-only mounts and ACLs make them misleading).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from core.errors import UserError


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
