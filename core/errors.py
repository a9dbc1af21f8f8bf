"""Errors caused by the user's input, and the command-line guard that prints them as one line.

Every entry point wraps its `main` in `run_main`: a `UserError` becomes ``error: <message>`` on stderr and exit
code 2, without a library traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """Bad input: a flag, file or value the user can fix. The message names it and says what to do."""


def run_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def command(main: Callable[[Sequence[str] | None], object]) -> None:
    """A console command's body: a quiet start (`core.startup`), then `main` on the command line under `run_main`."""
    from difftune.core.startup import quiet_start

    quiet_start()
    run_main(main)
