"""The entry scripts' start-up: read the config first, then import only what the run uses.

Why a start-up of its own: diffusers, peft, transformers and accelerate each import bitsandbytes at their own import
whenever it is installed (their availability checks are `importlib.util.find_spec("bitsandbytes")`), and
bitsandbytes' import costs most of a second and, on CPUs with AVX512-BF16, prints a warning about a `kernels`
package. A run without an 8-bit optimizer or a quantised base never calls it, so it is kept out before anything
imports diffusers: a `None` entry in `sys.modules` is Python's documented way to make a package unimportable
(`find_spec` then answers None and `import` raises ImportError), which every one of those libraries reads as "not
installed". The config is parsed before that decision, so it sees YAML files as well as flags. `datasets` (imported
only by the readers that need it, `finetune.data`) and tensorboard (imported by accelerate only when
`--report_to tensorboard`) need nothing here.

transformers, without torchvision (not a dependency here), warns once per image-processor class that diffusers'
pipeline modules import (the safety checker's feature extractor) that it falls back to the PIL processor; training
never uses them, so that one message is filtered out.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from finetune.loop import TrainResult
    from finetune.tasks import Task


def needs_bitsandbytes(cfg) -> bool:
    from finetune.optim import optimizer_name

    return optimizer_name(cfg) == "adamw8bit" or getattr(cfg, "quantize_base", None) is not None


def lean_start(cfg=None) -> None:
    """Before the run imports diffusers: keeps bitsandbytes out unless `cfg` uses it (None: a run that does not),
    and filters transformers' torchvision fallback notice."""
    if (cfg is None or not needs_bitsandbytes(cfg)) and "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None
    logging.getLogger("transformers.utils.import_utils").addFilter(_not_torchvision_fallback)


def _not_torchvision_fallback(record: logging.LogRecord) -> bool:
    return "requires torchvision (not installed); falling back to" not in record.getMessage()


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
