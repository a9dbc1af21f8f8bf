"""The one training loop for every baseline family, as a library (`fit`) and as a command line.

    python -m baselines.train --family vae --shapes --resolution 32 --max_train_steps 2000 --output_dir out/vae

`fit` reads top to bottom: draw a batch, compute the family's loss, step, keep the EMA, log, stop when the budget
(images, seconds or steps) is spent or the loss stops being finite. Families with adversarial training (the GAN)
provide `configure_optimizers(lr)` and `training_step(x, optimizers, step)` and do their own backward and steps.

Batches and noise are drawn from generators seeded by (seed, step), so a run resumed from a checkpoint continues
exactly as the uninterrupted run would have. `fit` runs on one process (accelerate chooses its device and
precision); the comparison trains small models, where data parallelism is not worth its complexity.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_model as load_weights
from safetensors.torch import save_model as save_weights
from torch import nn

from baselines import FAMILIES, build_model
from baselines.data import load_tensor
from core.errors import UserError, run_main

if TYPE_CHECKING:
    from diffusers.training_utils import EMAModel


@dataclass
class Budget:
    """When training stops: whichever of these is reached first (at least one must be set)."""

    images: int | None = None
    seconds: float | None = None
    steps: int | None = None

    def spent(self, images_seen: int, seconds: float, steps: int) -> bool:
        return (
            (self.images is not None and images_seen >= self.images)
            or (self.seconds is not None and seconds >= self.seconds)
            or (self.steps is not None and steps >= self.steps)
        )


@dataclass
class FitResult:
    losses: list[tuple[int, float]]  # (step, loss) every `log_every` steps
    images_seen: int
    seconds: float
    steps: int
    diverged: bool  # the loss became non-finite; training stopped there


@dataclass
class TrainState:
    """What a checkpoint holds besides the weights: optimizers, EMA, progress."""

    optimizers: list[torch.optim.Optimizer]
    ema: EMAModel | None = None
    step: int = 0
    images_seen: int = 0
    seconds: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)


def make_state(model: nn.Module, lr: float, ema: bool | None = None) -> TrainState:
    """Optimizers (the family's own, or AdamW) and, where the family uses one, an EMA of the trainable weights.

    `ema=None` takes the family's default (`model.use_ema`); the GAN keeps its generator EMA itself.
    """
    if hasattr(model, "configure_optimizers"):
        optimizers = model.configure_optimizers(lr)
    else:
        optimizers = [torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)]
    use_ema = getattr(model, "use_ema", False) if ema is None else ema
    if use_ema:
        from diffusers.training_utils import EMAModel  # imported here: it pulls in bitsandbytes, slow and chatty
    trainable = _trainable(model)
    # Warm-up EMA (decay 1 - (1 + step)^(-2/3)): useful after tens of steps, ~0.999 after tens of thousands.
    ema_model = EMAModel(trainable, use_ema_warmup=True, power=2 / 3, decay=0.9999) if use_ema else None
    return TrainState(optimizers, ema_model)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _ema_swapped(state: TrainState) -> bool:
    """True after `fit` returned: the model holds the EMA weights and the EMA keeps the live ones aside."""
    return state.ema is not None and state.ema.temp_stored_params is not None


def _seeded(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


def _batch(data: torch.Tensor, batch_size: int, seed: int, step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_seeded(seed, step))
    index = torch.randperm(len(data), generator=generator)[: min(batch_size, len(data))]
    return data[index]


def fit(
    model: nn.Module,
    data: torch.Tensor,
    *,
    batch_size: int,
    lr: float,
    budget: Budget,
    seed: int,
    accelerator=None,
    log_every: int = 10,
    on_log: Callable[[int, dict[str, float]], None] | None = None,
    ema: bool | None = None,
    state: TrainState | None = None,
    on_step: Callable[[TrainState], None] | None = None,
) -> FitResult:
    """Trains `model` on `data` (N, C, H, W) until `budget` is spent.

    With an EMA, its weights are copied into the model at the end and the live weights are kept aside in
    `state.ema`: passing the same `state` again (or saving it with `save_checkpoint`) continues from the live ones.
    `state` (from `make_state`, possibly restored from a checkpoint) resumes a run; `on_step(state)` runs after every
    step (the command line checkpoints and draws samples there).
    """
    if budget.images is None and budget.seconds is None and budget.steps is None:
        raise UserError("the training budget is empty: give images, seconds or steps")
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator()
    model.to(accelerator.device).train()
    data = data.to(accelerator.device)
    state = make_state(model, lr, ema) if state is None else state
    if state.ema is not None:
        state.ema.to(accelerator.device)
    adversarial = hasattr(model, "training_step")
    # The GAN steps its own optimizers; the others get accelerate's (loss scaling under fp16).
    optimizers = state.optimizers if adversarial else [accelerator.prepare(o) for o in state.optimizers]
    trainable = _trainable(model)
    if _ema_swapped(state):
        state.ema.restore(trainable)
    diverged, start = False, time.perf_counter() - state.seconds

    while not budget.spent(state.images_seen, state.seconds, state.step):
        x = _batch(data, batch_size, seed, state.step)
        torch.manual_seed(_seeded(seed + 1, state.step))  # the loss's noise, reproducible on resume
        with accelerator.autocast():
            terms = model.training_step(x, optimizers, state.step) if adversarial else model.loss(x)
        loss = float(terms["loss"].detach())
        if not math.isfinite(loss):  # stop before a non-finite gradient reaches the weights
            diverged = True
            break
        if not adversarial:
            accelerator.backward(terms["loss"])
            accelerator.clip_grad_norm_(trainable, 1.0)  # norm clipping at 1: a stray batch cannot blow a run up
            optimizers[0].step()
            optimizers[0].zero_grad(set_to_none=True)
        if state.ema is not None:
            state.ema.step(trainable)
        state.step += 1
        state.images_seen += len(x)
        state.seconds = time.perf_counter() - start
        if state.step % log_every == 0 or state.step == 1:
            state.losses.append((state.step, loss))
            if on_log is not None:
                on_log(state.step, {k: float(torch.as_tensor(v).detach()) for k, v in terms.items()})
        if on_step is not None:
            on_step(state)

    if state.ema is not None:
        state.ema.store(trainable)
        state.ema.copy_to(trainable)
    model.eval()
    return FitResult(list(state.losses), state.images_seen, state.seconds, state.step, diverged)


# ----------------------------------------------------------------------------------------------- saving, loading


def save_checkpoint(directory: Path, model: nn.Module, state: TrainState) -> None:
    """Weights as safetensors; optimizer/EMA state with torch.save, read back only with weights_only=True."""
    tmp = directory.with_name(directory.name + ".tmp")  # written aside, then renamed: an interrupt leaves no half
    tmp.mkdir(parents=True, exist_ok=True)
    swapped = _ema_swapped(state)
    if swapped:  # save the live weights; the EMA ones are in the EMA state
        state.ema.restore(_trainable(model))
    save_weights(model, str(tmp / "model.safetensors"))
    if swapped:
        state.ema.store(_trainable(model))
        state.ema.copy_to(_trainable(model))
    extra = {"optimizers": [o.state_dict() for o in state.optimizers]}
    if state.ema is not None:
        extra["ema"] = state.ema.state_dict()
    torch.save(extra, tmp / "training_state.pt")
    progress = {"step": state.step, "images_seen": state.images_seen, "seconds": state.seconds}
    (tmp / "progress.json").write_text(json.dumps({**progress, "losses": state.losses}))
    if directory.exists():  # the same step saved again after a resume
        shutil.rmtree(directory)
    tmp.rename(directory)


def load_checkpoint(directory: Path, model: nn.Module, state: TrainState) -> None:
    load_weights(model, str(directory / "model.safetensors"))
    extra = torch.load(directory / "training_state.pt", map_location="cpu", weights_only=True)
    for optimizer, saved in zip(state.optimizers, extra["optimizers"], strict=True):
        optimizer.load_state_dict(saved)
    if state.ema is not None:
        state.ema.load_state_dict(extra["ema"])
    progress = json.loads((directory / "progress.json").read_text())
    state.step, state.images_seen, state.seconds = progress["step"], progress["images_seen"], progress["seconds"]
    state.losses = [tuple(pair) for pair in progress["losses"]]


def save_model(directory: str | Path, model: nn.Module, family: str, resolution: int, channels: int, n_bits: int):
    """`model.safetensors` + `config.json` (family, sizes and the family's Config): all `load_model` needs."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_weights(model, str(directory / "model.safetensors"))
    meta = {"family": family, "resolution": resolution, "channels": channels, "n_bits": n_bits}
    meta["config"] = dataclasses.asdict(model.config)
    (directory / "config.json").write_text(json.dumps(meta, indent=2))


def load_model(directory: str | Path) -> nn.Module:
    """Rebuilds a saved model from its `config.json` (never from defaults) and loads its weights, in eval mode."""
    directory = Path(directory)
    if not (directory / "config.json").exists():
        raise UserError(f"{directory} holds no config.json; is it the output_dir of baselines.train?")
    meta = json.loads((directory / "config.json").read_text())
    sizes = {k: meta[k] for k in ("resolution", "channels", "n_bits")}
    options = {k: v for k, v in meta["config"].items() if k not in sizes}  # some Configs repeat the sizes
    model = build_model(meta["family"], **sizes, **options)
    load_weights(model, str(directory / "model.safetensors"))
    return model.eval()


def image_grid(x: torch.Tensor, columns: int = 8) -> Image.Image:
    """(N, C, H, W) in [0, 1] as one PIL image, `columns` wide, with a 1-pixel white border."""
    n, c, h, w = x.shape
    rows = math.ceil(n / columns)
    grid = np.ones((rows * (h + 1) + 1, columns * (w + 1) + 1, c), dtype=np.float32)
    pixels = x.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, C)
    for i in range(n):
        top, left = 1 + (i // columns) * (h + 1), 1 + (i % columns) * (w + 1)
        grid[top : top + h, left : left + w] = pixels[i]
    grid = (grid * 255 + 0.5).astype(np.uint8)
    return Image.fromarray(grid[:, :, 0] if c == 1 else grid)


# ----------------------------------------------------------------------------------------------- command line


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit code 2 through run_main, not argparse's usage block
        raise UserError(f"{message} (see --help)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = _Parser(prog="python -m baselines.train", description="Train one baseline family.")
    p.add_argument("--family", required=True, help=f"one of {', '.join(FAMILIES)}")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--shapes", action="store_true", help="train on the embedded shapes world")
    source.add_argument("--train_data_dir")
    source.add_argument("--dataset_name")
    p.add_argument("--image_column", default="image")
    p.add_argument("--caption_column", default="text")
    p.add_argument("--n_per_class", type=int, default=100, help="shapes images per colour and shape")
    p.add_argument("--resolution", type=int, default=32)
    p.add_argument("--channels", type=int, choices=(1, 3), default=None, help="default: from the data")
    p.add_argument("--n_bits", type=int, default=8)
    p.add_argument("--max_train_steps", type=int, required=True)
    p.add_argument("--output_dir", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch_size", type=int, default=32)
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no")
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--resume_from_checkpoint", default=None, help='"latest" or a checkpoint folder')
    p.add_argument("--sample_every", type=int, default=500, help="write a sample grid every N steps")
    p.add_argument("--log_every", type=int, default=10)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a field of the family's Config")
    return p.parse_args(argv)


def _overrides(pairs: list[str]) -> dict:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise UserError(f"--set {pair!r} is not KEY=VALUE")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value  # a bare string such as loss=wgan-gp
    return overrides


def _find_checkpoint(output_dir: Path, resume: str) -> Path | None:
    if resume != "latest":
        path = Path(resume)
        if not (path / "progress.json").exists():
            raise UserError(f"--resume_from_checkpoint {resume} is not a checkpoint folder")
        return path
    found = [p for p in output_dir.glob("checkpoint-*") if p.name.split("-")[1].isdigit()]
    return max(found, key=lambda p: int(p.name.split("-")[1]), default=None)


def main(argv: Sequence[str] | None = None) -> None:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    args = parse_args(argv)
    if args.family not in FAMILIES:
        raise UserError(f"unknown family {args.family!r}; choose from {', '.join(FAMILIES)}")
    if args.family == "gan" and args.mixed_precision == "fp16":
        raise UserError("--mixed_precision fp16 is not supported for the gan (no loss scaling); use bf16 or no")
    output_dir = Path(args.output_dir)
    data, _ = load_tensor(
        args.shapes, args.train_data_dir, args.dataset_name, args.resolution, args.channels, args.n_bits,
        None, args.image_column, args.caption_column, n_per_class=args.n_per_class, seed=args.seed,
    )  # fmt: skip
    channels = data.shape[1]
    model = build_model(args.family, args.resolution, channels, args.n_bits, **_overrides(args.set))
    accelerator = Accelerator(mixed_precision=args.mixed_precision, log_with="tensorboard", project_dir=output_dir)
    if accelerator.num_processes > 1:
        raise UserError("baselines.train runs on one process; launch it without a multi-process accelerate config")
    accelerator.init_trackers("baselines", config={k: v for k, v in vars(args).items() if k != "set"})
    state = make_state(model, args.learning_rate)
    if args.resume_from_checkpoint:
        checkpoint = _find_checkpoint(output_dir, args.resume_from_checkpoint)
        if checkpoint is None:
            accelerator.print(f"no checkpoint in {output_dir}; starting a new run")
        else:
            load_checkpoint(checkpoint, model, state)
            accelerator.print(f"resumed from {checkpoint} at step {state.step}")
    bar = tqdm(total=args.max_train_steps, initial=state.step, disable=not accelerator.is_local_main_process)

    def on_log(step: int, terms: dict[str, float]) -> None:
        accelerator.log(terms, step=step)
        bar.set_postfix(loss=f"{terms['loss']:.4f}")

    def on_step(state: TrainState) -> None:
        bar.update(1)
        if state.step % args.checkpointing_steps == 0 or state.step == args.max_train_steps:
            save_checkpoint(output_dir / f"checkpoint-{state.step}", model, state)
        if state.step % args.sample_every == 0 or state.step == args.max_train_steps:
            write_samples(model, state, output_dir / "samples" / f"step-{state.step:06d}.png", args.seed)

    result = fit(
        model, data, batch_size=args.batch_size, lr=args.learning_rate, budget=Budget(steps=args.max_train_steps),
        seed=args.seed, accelerator=accelerator, log_every=args.log_every, on_log=on_log, state=state, on_step=on_step,
    )  # fmt: skip
    bar.close()
    if result.diverged:
        accelerator.print(f"stopped at step {result.steps}: the loss is no longer finite")
    save_model(output_dir, model, args.family, args.resolution, channels, args.n_bits)
    accelerator.end_training()


@torch.no_grad()
def write_samples(model: nn.Module, state: TrainState, path: Path, seed: int, n: int = 16) -> None:
    """A grid of `n` samples, drawn with the EMA weights where there are some, then training resumes."""
    trainable = _trainable(model)
    if state.ema is not None:
        state.ema.store(trainable)
        state.ema.copy_to(trainable)
    model.eval()
    x = model.sample(n, generator=torch.Generator().manual_seed(seed))  # CPU generator: same grid on any device
    model.train()
    if state.ema is not None:
        state.ema.restore(trainable)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid(x).save(path)


if __name__ == "__main__":
    run_main(main)
