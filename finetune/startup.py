"""The training entry scripts' `main`: read the config (flags and YAML), train, report."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from difftune.finetune.loop import TrainResult
    from difftune.finetune.tasks import Task


def run_task(argv: Sequence[str] | None, task: Task, description: str, prog: str | None = None) -> TrainResult | None:
    """An entry script's whole `main`: flags and --config files, then training; the main process reports. `prog`
    (the name in usage and errors) defaults to how the program was started: `difftune-train-lora`, `finetune_lora.py`.
    With `--plan` or `--fit` it prints the memory plan instead (`finetune.planner`) and returns None."""
    from difftune.core.config import parse

    cfg = parse(task.config_class, argv, description, prog=prog, validate=False)
    if cfg.plan.requested:  # validated for the machine it plans for
        from difftune.finetune.planner import run_plan

        run_plan(cfg, task)
        return None
    cfg.validate()
    from difftune.finetune.loop import train

    result = train(cfg, task)
    if result.is_main_process:
        compiled = ""
        if cfg.speed.compile and len(result.step_seconds) > 1:
            rest = result.step_seconds[1:]
            compiled = (
                f" (first step {result.step_seconds[0]:.1f}s with compilation, then {sum(rest) / len(rest):.3f}s each)"
            )
        print(
            f"trained {result.global_step} steps in {result.seconds:.1f}s{compiled}; {task.result} saved in {cfg.training.output_dir}"
        )
    return result
