"""Full fine-tuning of the denoiser (optionally the text encoders), saving a diffusers pipeline folder.

`accelerate launch finetune/finetune_full.py --pretrained_model_name_or_path ... --train_data_dir ...`. Shares
the training loop with `finetune_lora.py`; only what trains and how it is saved differ. With `--use_ema` the
saved UNet is the exponential moving average of the trained weights.
"""

from __future__ import annotations

from collections.abc import Sequence

from difftune.core.errors import command
from difftune.finetune.startup import run_task
from difftune.finetune.tasks import FULL


def main(argv: Sequence[str] | None = None) -> None:
    run_task(argv, FULL, __doc__)


def cli() -> None:
    """The `difftune-train-full` command."""
    command(main)


if __name__ == "__main__":
    cli()
