"""LoRA fine-tuning of Stable Diffusion: `accelerate launch finetune/finetune_lora.py --train_data_dir ...`.

With no arguments it runs the embedded demo: the tiny `pipelines/tiny_shapes` base, which has never seen the
colour purple, learns `a purple {circle,square,triangle}` from a generated imagefolder, and the colour accuracy
of purple prompts is measured before and after (with the base colours and shapes checked for damage).
`--demo flow` runs the same demo on the embedded flow base `pipelines/tiny_flow_shapes` (an SD 3 transformer).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import the project, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from core.errors import run_main
from finetune.startup import lean_start, run_task
from finetune.tasks import LORA


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    demo = demo_name(argv)
    if demo is not None:
        lean_start()  # the demos use no 8-bit option
        from finetune.demo import demo_config, run_demo

        run_demo(demo_config(demo))
        return
    run_task(argv, LORA, __doc__, prog="finetune_lora.py")


def demo_name(argv: list[str]) -> str | None:
    """`unet` for no arguments or a bare `--demo`; `flow` for `--demo flow`; None for a training run."""
    if not argv or argv == ["--demo"]:
        return "unet"
    if argv[0] == "--demo" and len(argv) == 2:
        return argv[1]
    if argv[0].startswith("--demo="):
        return argv[0].removeprefix("--demo=")
    return None


if __name__ == "__main__":
    from core.errors import run_main

    run_main(main)
