"""The embedded demo: the tiny base learns the colour purple through a LoRA, measured before and after.

The purple set is generated into `.cache/difftune/purple` as an imagefolder and read through the same data path
as user data. Accuracy is measured by `pipelines.evaluate` (DPM-Solver++ 20 steps, guidance 7.5, 4 seeds).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from finetune.config import REPO_ROOT, TrainConfig, load_yaml, validate
from finetune.finetune_lora import LORA
from finetune.loop import train
from pipelines import shapes
from pipelines.errors import UserError
from pipelines.evaluate import shapes_accuracy

PURPLE_DIR = REPO_ROOT / ".cache" / "difftune" / "purple"


def purple_prompts() -> list[str]:
    return shapes.prompts((shapes.HELD_OUT_COLOUR,), shapes.SHAPES)


def evaluate(model: str, lora_dir: Path | None, seeds: int) -> dict[str, shapes.Accuracy]:
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    if lora_dir is not None:
        pipe.load_lora_weights(lora_dir)
    purple, _ = shapes_accuracy(pipe, purple_prompts(), seeds=seeds)
    base, _ = shapes_accuracy(pipe, shapes.prompts(), seeds=seeds)
    return {"purple": purple, "base": base}


def run_demo(config_path: Path, seeds: int = 4, output_dir: str | None = None) -> dict:
    values = load_yaml(config_path)
    model = str(REPO_ROOT / values["pretrained_model_name_or_path"])
    if not (Path(model) / "model_index.json").exists():
        raise UserError(f"{model} is missing: the embedded base ships with the repo; restore it with git")
    if not (PURPLE_DIR / "metadata.jsonl").exists():
        shapes.write_dataset(PURPLE_DIR, (shapes.HELD_OUT_COLOUR,), shapes.SHAPES, per_class=20, seed=1)
    values.update(pretrained_model_name_or_path=model, train_data_dir=str(PURPLE_DIR))
    values["output_dir"] = output_dir or str(REPO_ROOT / values["output_dir"])
    cfg = TrainConfig(**values)
    validate(cfg)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    before = evaluate(model, None, seeds)
    print(f"before: purple prompts {before['purple']}; base prompts {before['base']}")
    start = time.time()
    result = train(cfg, LORA)
    train_seconds = time.time() - start
    after = evaluate(model, Path(cfg.output_dir), seeds)
    print(f"after:  purple prompts {after['purple']}; base prompts {after['base']}")
    print(
        f"\npurple colour accuracy {before['purple'].colour:.2f} -> {after['purple'].colour:.2f}; "
        f"base colours with the adapter {after['base'].colour:.2f} (base alone {before['base'].colour:.2f}); "
        f"training {train_seconds:.0f}s for {result.global_step} steps; LoRA in {cfg.output_dir}"
    )
    return {"before": before, "after": after, "train_seconds": train_seconds, "output_dir": cfg.output_dir}
