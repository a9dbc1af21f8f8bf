"""Reading the text files users hand us and writing the files we produce, each failure one line naming the file.

Text is read as UTF-8 (a byte-order mark is dropped): a file in another encoding is an error naming it, never text
decoded wrong (a Latin-1 caption read as UTF-8 would fail; read as Latin-1 when it was CP-1252 or UTF-8 it would
train on garbled words without a word said). Results are written atomically: into a temporary name beside the
target, renamed into place when complete, the temporary removed when writing fails (a full disk, a quota), so a
target is either the old file, the complete new one, or absent; never half-written.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from difftune.core.errors import UserError

UTF8_FIX = "save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"


def read_text(path: str | Path, fix: str = UTF8_FIX) -> str:
    """The file's text; `UserError` naming it when it cannot be read or is not UTF-8 (`fix` says what to do)."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(
            f"{path}: not UTF-8 text (byte {err.object[err.start]:#04x} at position {err.start}); {fix}"
        ) from None
    except OSError as err:
        raise UserError(f"{path}: cannot be read ({err.strerror or err})") from None


def read_json(path: str | Path, fix: str) -> object:
    """The file's JSON; `UserError` naming it when it cannot be read or parsed (`fix` says what to do)."""
    text = read_text(path, fix)
    try:
        return json.loads(text)
    except ValueError as err:
        raise UserError(f"{path}: not valid JSON ({err}); {fix}") from None


def reason(err: BaseException) -> str:
    """A write failure's reason in a few words: the OS's (`No space left on device`) or the library's first line."""
    return getattr(err, "strerror", None) or (str(err).splitlines() or [type(err).__name__])[0]


def remove(path: Path) -> None:
    """Removes a file or folder, if there is one."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` (a file or a folder) to write into; renamed to `path` when the block ends, or
    removed when it raises. An existing `path` is replaced only by a complete new one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    remove(tmp)
    try:
        yield tmp
        if path.is_dir() and tmp.is_dir():  # a folder cannot be renamed over another: swap through an `.old` name
            old = path.with_name(f".{path.name}.{os.getpid()}.old")
            path.rename(old)
            tmp.rename(path)
            remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def stale_temporaries(folder: Path) -> list[Path]:
    """Temporaries `atomic` left in `folder` when its process was killed (its pid no longer runs here)."""
    stale = []
    for tmp in Path(folder).glob(".*.tmp"):
        pid = tmp.name.rsplit(".", 2)[-2]
        if pid.isdigit() and not _running(int(pid)):
            stale.append(tmp)
    return stale


def _running(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
