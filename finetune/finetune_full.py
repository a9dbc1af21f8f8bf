"""Full fine-tuning of the denoiser (optionally the text encoders), saving a diffusers pipeline folder.

`accelerate launch finetune/finetune_full.py --pretrained_model_name_or_path ... --train_data_dir ...`. Shares
the training loop with `finetune_lora.py`; only what trains and how it is saved differ. With `--use_ema` the
saved UNet is the exponential moving average of the trained weights.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

if __package__ in (None, ""):  # run as a file: import the project, not this folder's modules
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from finetune.startup import run_task
from finetune.tasks import FULL


def main(argv: Sequence[str] | None = None) -> None:
    run_task(argv, FULL, __doc__, prog="finetune_full.py")


if __name__ == "__main__":
    from core.errors import run_main

    run_main(main)
