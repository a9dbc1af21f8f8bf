"""Runs finetune_lora.py as a user would, and kills it (SIGKILL) or interrupts it (SIGINT) at a chosen point.

    python tests/reliability/fault_launcher.py KIND:SIGNAL:N -- <finetune_lora.py flags>

KIND says where the signal lands, N which occurrence: `step` (the N-th training batch, before its loss), `cache`
(the N-th latent or text cache entry, mid-write: its temporary file there, empty), `write`
(the N-th safetensors file a checkpoint save writes: mid-save, files half there), `rename` (the N-th checkpoint
moved into place: complete but not yet renamed). SIGNAL is KILL or INT. `none:KILL:0` runs without a fault.
The process signals itself, so the point is exact without any hook in the code under test.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

from difftune.core import checkpoint
from difftune.core.errors import run_main
from difftune.finetune import cache, loop
from difftune.finetune.finetune_lora import main


def arm(kind: str, sig: str, n: int) -> None:
    count = 0

    def hit():
        nonlocal count
        count += 1
        if count == n:
            os.kill(os.getpid(), getattr(signal, f"SIG{sig}"))

    def wrap(fn):
        def wrapped(*args, **kwargs):
            hit()
            return fn(*args, **kwargs)

        return wrapped

    if kind == "step":
        loop.batch_loss = wrap(loop.batch_loss)
    elif kind == "cache":  # mid-write: the entry's temporary file exists, empty, when the signal lands
        save = cache.save_file
        cache.save_file = lambda tensors, path, *a, **k: (Path(path).touch(), hit(), save(tensors, path, *a, **k))[2]
    elif kind == "write":
        checkpoint.save_file = wrap(checkpoint.save_file)
    elif kind == "rename":
        original = Path.rename
        Path.rename = lambda self, target: (hit() if self.name.endswith(".tmp") else None, original(self, target))[1]


if __name__ == "__main__":
    spec, _, *flags = sys.argv[1:]
    kind, sig, n = spec.split(":")
    arm(kind, sig, int(n))
    run_main(main, flags)
