"""The entry scripts' start-up: read the config first, then import only what the run uses.

The config is parsed before anything imports diffusers, so the decision about bitsandbytes (core/startup.py: kept
out unless the run uses an 8-bit optimizer or a quantised base) sees YAML files as well as flags. `datasets`
(imported only by the readers that need it, `finetune.data`) and tensorboard (imported by accelerate only when
`--report_to tensorboard`) need nothing here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from core.startup import quiet_start

if TYPE_CHECKING:
    from finetune.loop import TrainResult
    from finetune.tasks import Task


def needs_bitsandbytes(cfg) -> bool:
    from finetune.optim import optimizer_name

    return optimizer_name(cfg) == "adamw8bit" or getattr(cfg, "quantize_base", None) is not None


def lean_start(cfg=None) -> None:
    """Before the run imports diffusers: `core.startup.quiet_start`, keeping bitsandbytes only if `cfg` uses it
    (None: a run that does not)."""
    quiet_start(bitsandbytes=cfg is not None and needs_bitsandbytes(cfg))


def run_task(argv: Sequence[str] | None, task: Task, description: str, prog: str) -> TrainResult:
    """An entry script's whole `main`: flags and --config files, then training; the main process reports."""
    from core.config import parse

    cfg = parse(task.config_class, argv, description, prog=prog)
    lean_start(cfg)
    from finetune.loop import train

    result = train(cfg, task)
    if result.is_main_process:
        compiled = ""
        if cfg.compile and len(result.step_seconds) > 1:
            rest = result.step_seconds[1:]
            compiled = (
                f" (first step {result.step_seconds[0]:.1f}s with compilation, then {sum(rest) / len(rest):.3f}s each)"
            )
        print(
            f"trained {result.global_step} steps in {result.seconds:.1f}s{compiled}; {task.result} saved in {cfg.output_dir}"
        )
    return result
