"""LoRA (and DoRA, LoHa, LoKr) fine-tuning: `accelerate launch finetune/finetune_lora.py --train_data_dir ...`.

Also `difftune-train-lora` and `accelerate launch -m difftune.finetune.finetune_lora`. The adapter trains on the
denoiser (and optionally the CLIP text encoders) through peft; the result is `pytorch_lora_weights.safetensors`,
which the family's diffusers pipeline loads with `load_lora_weights`. The embedded demo is `difftune-demo`.
"""

from __future__ import annotations

from collections.abc import Sequence

from difftune.core.errors import command
from difftune.finetune.startup import run_task
from difftune.finetune.tasks import LORA


def main(argv: Sequence[str] | None = None) -> None:
    run_task(argv, LORA, __doc__)


def cli() -> None:
    """The `difftune-train-lora` command."""
    command(main)


if __name__ == "__main__":
    cli()
