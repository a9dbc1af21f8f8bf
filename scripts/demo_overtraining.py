"""The embedded demo run deliberately too long, to show what `--keep_best_by validation_loss` picks.

The demo (`configs/demo_lora.yaml`, read through `finetune.demo.demo_values`, so a change to the demo's settings
is picked up here) trains with 10% of its images held out, a validation loss every `--validation_steps`, a
checkpoint at each, and `--keep_best_by validation_loss`. Afterwards every checkpoint is scored with the shapes
world's protocol (`toyworld.evaluate.shapes_accuracy`: purple prompts' colour, base prompts' colour and shape),
and the curve goes to a PNG and a JSON of the numbers:

    python scripts/demo_overtraining.py --max_train_steps 6000 --validation_steps 250 --output docs/demo_overtraining

Run with `OMP_NUM_THREADS` set; the run takes a while on a laptop CPU (minutes per thousand steps).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

if __name__ == "__main__":  # run as a program: keep out the imports it does not use (core/startup.py)
    from difftune.core.startup import quiet_start

    quiet_start()

import torch

from difftune.core import checkpoint as ckpt
from difftune.core.config import from_values, to_dict
from difftune.finetune.config import LoraTrainConfig
from difftune.finetune.demo import demo_config, demo_values, purple_prompts
from difftune.finetune.loop import BEST, load_models, train
from difftune.finetune.tasks import LORA
from difftune.toyworld import shapes
from difftune.toyworld.evaluate import shapes_accuracy


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max_train_steps", type=int, default=6000, help="The deliberately long run.")
    parser.add_argument("--validation_steps", type=int, default=250, help="Validation loss and score every N steps.")
    parser.add_argument("--validation_split", type=float, default=0.1, help="Fraction of the images held out.")
    parser.add_argument("--seeds", type=int, default=4, help="Sampling seeds per prompt when scoring.")
    parser.add_argument("--work_dir", default="outputs/demo-overtraining", help="Data and run.")
    parser.add_argument("--output", default="docs/demo_overtraining", help="<output>.png/.json")
    return parser.parse_args(argv)


def run_config(args) -> LoraTrainConfig:
    """The demo's own settings, made long, with the validation split and best-checkpoint selection."""
    values = demo_values("unet", Path(args.work_dir))
    values.update(
        max_train_steps=args.max_train_steps, validation_split=args.validation_split,
        validation_steps=args.validation_steps, checkpointing_steps=args.validation_steps,
        keep_best_by="validation_loss", validation_prompt=None,  # scored below instead of sample grids
    )  # fmt: skip
    return from_values(LoraTrainConfig, values, str(demo_config("unet")))


@torch.no_grad()
def score_checkpoints(cfg: LoraTrainConfig, seeds: int) -> dict[int, dict]:
    """Each checkpoint's weights in the demo's model, scored: {step: {purple_colour, ..., base_shape}}."""
    from accelerate import Accelerator

    family, trainable, _ = load_models(cfg, LORA, Accelerator(cpu=True))
    for module in trainable.models.values():
        module.eval()
    pipe = family.pipeline(family.sampling_scheduler())
    scores = {}
    for folder in ckpt.list_checkpoints(Path(cfg.training.output_dir)):
        ckpt.load_weights(folder, trainable.models)
        purple, _ = shapes_accuracy(pipe, purple_prompts(), seeds=seeds)
        base, _ = shapes_accuracy(pipe, shapes.prompts(), seeds=seeds)
        step = int(folder.name.removeprefix(ckpt.PREFIX))
        scores[step] = {"purple_colour": purple.colour, "purple_shape": purple.shape, "base_colour": base.colour,
                        "base_shape": base.shape}  # fmt: skip
        print(f"step {step}: purple colour {purple.colour:.2f} shape {purple.shape:.2f}; "
              f"base colour {base.colour:.2f} shape {base.shape:.2f}", flush=True)  # fmt: skip
    return scores


def plot(points: list[dict], best_step: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    steps = [p["step"] for p in points]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    top.plot(steps, [p["validation_loss"] for p in points], marker="o", ms=3, color="black")
    top.axvline(best_step, color="tab:green", ls="--", label=f"best validation loss (step {best_step})")
    top.set_ylabel("validation loss")
    top.legend()
    for key, colour in (("purple_colour", "purple"), ("purple_shape", "plum"), ("base_colour", "tab:blue"),
                        ("base_shape", "tab:orange")):  # fmt: skip
        bottom.plot(steps, [p[key] for p in points], marker="o", ms=3, color=colour, label=key.replace("_", " "))
    bottom.axvline(best_step, color="tab:green", ls="--")
    bottom.set_ylim(-0.02, 1.02)
    bottom.set_xlabel("step")
    bottom.set_ylabel("accuracy (shapes scorer)")
    bottom.legend(loc="lower right", fontsize=8)
    fig.suptitle("Embedded LoRA demo run long: validation loss and scored accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    args = parse_args(argv)
    cfg = run_config(args)
    start = time.time()
    result = train(cfg, LORA)
    train_seconds = time.time() - start
    scores = score_checkpoints(cfg, args.seeds)
    points = [{"step": step, "validation_loss": loss, **scores[step]} for step, loss in result.validation_losses]
    best = json.loads((Path(cfg.training.output_dir) / BEST / "best.json").read_text())
    chosen = next(p for p in points if p["step"] == best["step"])
    record = {
        "command": "python scripts/demo_overtraining.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "settings": {k: v for k, v in to_dict(cfg).items() if k in ("max_train_steps", "learning_rate", "lr_scheduler",
                     "rank", "validation_split", "validation_steps", "seed")},  # fmt: skip
        "held_out_images": best["held_out_images"], "scoring_seeds": args.seeds,
        "torch_threads": torch.get_num_threads(), "train_seconds": round(train_seconds, 1),
        "best": chosen, "last": points[-1], "points": points,
    }  # fmt: skip
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    plot(points, chosen["step"], output.with_suffix(".png"))
    for name, p in (("chosen", chosen), ("last", points[-1])):
        print(f"{name}: step {p['step']}, validation loss {p['validation_loss']:.5f}, purple colour "
              f"{p['purple_colour']:.2f}, base colour {p['base_colour']:.2f}, base shape {p['base_shape']:.2f}")  # fmt: skip
    print(f"wrote {output.with_suffix('.png')} and {output.with_suffix('.json')}")
    return record


if __name__ == "__main__":
    from difftune.core.errors import run_main

    run_main(main)
