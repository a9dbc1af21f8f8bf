"""LoRA fine-tuning of Stable Diffusion: `accelerate launch finetune/finetune_lora.py --train_data_dir ...`.

With no arguments it runs the embedded demo: the tiny `pipelines/tiny_shapes` base, which has never seen the
colour purple, learns `a purple {circle,square,triangle}` from a generated imagefolder, and the colour accuracy
of purple prompts is measured before and after (with the base colours checked for damage).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import the project, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from core.errors import run_main
from finetune.config import REPO_ROOT
from finetune.startup import lean_start, run_task
from finetune.tasks import LORA

DEMO_CONFIG = REPO_ROOT / "configs" / "demo_lora.yaml"


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv == ["--demo"]:
        lean_start()  # the demo uses no 8-bit option
        from finetune.demo import run_demo

        run_demo(DEMO_CONFIG)
        return
    run_task(argv, LORA, __doc__, prog="finetune_lora.py")


if __name__ == "__main__":
    from core.errors import run_main

    run_main(main)
