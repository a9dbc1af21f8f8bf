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
from finetune.config import REPO_ROOT, TrainConfig
from finetune.export import save_lora, save_lora_kohya, save_peft_adapters, write_model_card
from finetune.hub import push_to_hub
from finetune.loop import Task, run_task
from finetune.model import TEXT_ATTENTION, adapter_config, add_adapter

DEMO_CONFIG = REPO_ROOT / "configs" / "demo_lora.yaml"


def setup(comps, cfg: TrainConfig) -> dict:
    add_adapter(
        comps.unet, adapter_config(cfg.adapter, cfg.rank, cfg.lora_alpha, cfg.lora_dropout, cfg.target_modules)
    )
    models = {"unet": comps.unet}
    if cfg.train_text_encoder:
        for name in ("text_encoder", "text_encoder_2"):
            encoder = getattr(comps, name)
            if encoder is not None:
                add_adapter(
                    encoder, adapter_config(cfg.adapter, cfg.rank, cfg.lora_alpha, cfg.lora_dropout, TEXT_ATTENTION)
                )
                models[name] = encoder
    return models


def save(comps, cfg: TrainConfig, output_dir: Path, ema) -> None:
    encoders = (comps.text_encoder, getattr(comps, "text_encoder_2", None))
    if cfg.adapter in ("loha", "lokr"):  # no diffusers LoRA format exists for these: peft's own format
        save_peft_adapters(
            output_dir, {"unet": comps.unet, "text_encoder": encoders[0], "text_encoder_2": encoders[1]}
        )
    else:
        save_lora(comps.unet, output_dir, *encoders)
    if cfg.output_kohya_format:
        save_lora_kohya(comps.unet, output_dir, *encoders, family=comps.family)
    write_model_card(output_dir, cfg, "lora", comps.family)
    if cfg.push_to_hub:
        push_to_hub(output_dir, cfg)


LORA = Task(name="lora", setup=setup, save=save)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv == ["--demo"]:
        from finetune.demo import run_demo

        run_demo(DEMO_CONFIG)
        return
    run_task(argv, LORA, __doc__)


if __name__ == "__main__":
    run_main(main)
