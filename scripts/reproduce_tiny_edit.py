"""Reproduces the embedded edit base `pipelines/tiny_edit_shapes` from nothing but the shipped flow base's VAE and
CLIP: a `FluxKontextPipeline` that recolours a shape on instructions ``make it {red,green,blue,yellow}``.

1. writes the edit pairs (`toyworld.shapes.write_edit_dataset`: every base colour to every base colour, each shape;
   purple is held back for the demo) as an imagefolder with a `control_file_name` column;
2. assembles a fresh pipeline (`toyworld.tiny_edit.build_edit_pipeline`): random transformer and T5, the flow
   base's VAE (its latents normalised) and CLIP, the held-back word's embedding rows drawn afresh
   (`redraw_unseen_word`);
3. trains the transformer with `finetune_full.py`'s task and `configs/tiny_edit_base.yaml` (latents of both images
   of each pair and the instructions cached, EMA);
4. scores it through plain diffusers on held-out input images (`toyworld.evaluate.edit_accuracy`): base-colour
   edits (colour asked, shape kept) and ``make it purple``; with `--install`, copies it into `pipelines/`.

    python scripts/reproduce_tiny_edit.py --work_dir runs/tiny_edit_shapes --install
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

if __name__ == "__main__":  # run as a program: keep out the imports it does not use (core/startup.py)
    from difftune.core.startup import quiet_start

    quiet_start()

import torch

from difftune.core.config import option, parse
from difftune.core.errors import run_main
from difftune.core.paths import embedded_base, shipped_configs
from difftune.finetune.config import FullTrainConfig
from difftune.finetune.loop import train
from difftune.finetune.tasks import FULL
from difftune.pipelines.loading import load_pipeline
from difftune.scripts.reproduce_tiny_shapes import install
from difftune.toyworld import shapes
from difftune.toyworld.evaluate import edit_accuracy, held_out_inputs
from difftune.toyworld.tiny_edit import build_edit_pipeline

BASE_NAME = "tiny_edit_shapes"
PARTS_FROM = "tiny_flow_shapes"  # the shipped base whose VAE and CLIP the edit base reuses


@dataclass
class ReproduceEditConfig:
    work_dir: str = option("Where data, the initial and the trained pipeline go.", default=f"runs/{BASE_NAME}")
    per_class: int = option("Pairs per input colour x wanted colour x shape.", default=50)
    base_config: str | None = option("The transformer's training config (finetune_full.py keys).", default=None)
    max_train_steps: int | None = option("Override the config's steps (a smoke run).", default=None)
    size: str = option("Transformer size (`test` for a smoke run).", default="base", choices=("test", "base"))
    eval_per_class: int = option("Held-out input images per colour x shape for the scores.", default=2)
    redraw_seed: int = option("Seed of the held-back word's embedding rows (see `redraw_unseen_word`).", default=1)
    install: bool = option("Copy the result into pipelines/tiny_edit_shapes.", default=False)


@torch.no_grad()
def redraw_unseen_word(pipe, word: str, seed: int) -> None:
    """Draws the token-embedding row of `word` afresh in the frozen CLIP and T5 encoders (one generator, CLIP first;
    each row from a normal of its table's own spread). The word is in no training instruction, so the trained
    transformer is the same for any draw (CLIP is causal, and T5 never sees the word in a training caption): only
    what the unseen word means to the base changes. With the rows as built, the base turned ``make it purple`` into
    purple shapes in 12 of 12 edits (a blend of the colours it knows), leaving the demo nothing to teach."""
    generator = torch.Generator().manual_seed(seed)
    for tokenizer, encoder in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        (token,) = tokenizer(word, add_special_tokens=False).input_ids
        weight = encoder.get_input_embeddings().weight
        weight[token] = torch.randn(weight.shape[1], generator=generator) * weight.std()


def score(model: str, per_class: int) -> dict[str, shapes.Accuracy]:
    """The base-colour edits and ``make it purple`` on held-out inputs, through plain diffusers."""
    pipe, _ = load_pipeline(model)
    inputs = held_out_inputs(per_class=per_class)
    return {
        "base": edit_accuracy(pipe, inputs, shapes.BASE_COLOURS),
        "purple": edit_accuracy(pipe, inputs, (shapes.HELD_OUT_COLOUR,)),
    }


def main(argv: Sequence[str] | None = None) -> None:
    args = parse(ReproduceEditConfig, argv, __doc__, prog="reproduce_tiny_edit.py")
    work = Path(args.work_dir)
    start = time.time()
    data = work / "data"
    if not (data / "metadata.jsonl").exists():
        shapes.write_edit_dataset(data, per_class=args.per_class, seed=0)
    init = work / "init"
    if not (init / "model_index.json").exists():
        pipe = build_edit_pipeline(embedded_base(PARTS_FROM), args.size, seed=0, work_dir=work)
        redraw_unseen_word(pipe, shapes.HELD_OUT_COLOUR, args.redraw_seed)
        pipe.save_pretrained(init)
        for name in ("vocab.json", "merges.txt"):  # the CLIP tokenizer's files, as the shipped bases keep them
            shutil.copy2(embedded_base(PARTS_FROM) / "tokenizer" / name, init / "tokenizer" / name)
    overrides = ["--pretrained_model_name_or_path", str(init), "--train_data_dir", str(data),
                 "--output_dir", str(work / "base"),
                 "--config", args.base_config or str(shipped_configs() / "tiny_edit_base.yaml")]  # fmt: skip
    if args.max_train_steps:
        overrides += ["--max_train_steps", str(args.max_train_steps)]
    result = train(parse(FullTrainConfig, overrides, prog="finetune_full.py"), FULL)
    print(
        f"edit transformer: {result.global_step} steps in {result.seconds:.0f}s on {torch.get_num_threads()} threads"
    )
    scores = score(str(work / "base"), args.eval_per_class)
    print(f"{BASE_NAME}: make it {{base colour}}: {scores['base']}; make it purple: {scores['purple']}")
    if args.install:
        install(work, embedded_base(BASE_NAME))
    print(f"total {time.time() - start:.0f}s")


if __name__ == "__main__":
    run_main(main)
