"""The one training loop for every baseline family, as a library (`fit`) and as a command line.

    difftune-train-baseline --family vae --shapes --resolution 32 --max_train_steps 2000 --output_dir out/vae

`fit` reads top to bottom: draw a batch, compute the family's loss, step, keep the EMA, log, stop when the budget
(images, seconds or steps) is spent or the loss stops being finite. Families with adversarial training (the GAN)
provide `configure_optimizers(lr)` and `training_step(x, optimizers, step)` and do their own backward and steps.

Batches and noise are drawn from generators seeded by (seed, step), so a run resumed from a checkpoint continues
exactly as the uninterrupted run would have. Settings are a `core.config` dataclass (`TrainConfig`: flags or a
`--config` YAML file), checkpoints are `core.checkpoint` folders (safetensors + JSON). `fit` runs on one process (accelerate chooses its device and
precision); the comparison trains small models, where data parallelism is not worth its complexity.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_model as load_weights
from safetensors.torch import save_model as save_weights
from torch import nn

from difftune.baselines import FAMILIES, build_model, check_options
from difftune.baselines.data import load_tensor
from difftune.core import checkpoint
from difftune.core.config import option, parse, to_dict
from difftune.core.errors import UserError, command
from difftune.core.images import tensor_grid
from difftune.core.paths import check_output_dir

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

    def fraction(self, images_seen: int, seconds: float, steps: int) -> float:
        """How much of the budget is spent: the largest share of any limit set (1 or more once `spent`)."""
        limits = ((images_seen, self.images), (seconds, self.seconds), (steps, self.steps))
        return max(done / limit for done, limit in limits if limit is not None)


@dataclass
class FitResult:
    losses: list[tuple[int, float]]  # (step, loss) every `log_every` steps
    images_seen: int
    seconds: float
    steps: int
    diverged: bool  # the loss became non-finite; training stopped there


@dataclass
class TrainState:
    """What a checkpoint holds besides the weights: optimizers, LR schedulers, EMA, progress."""

    optimizers: list[torch.optim.Optimizer]
    ema: EMAModel | None = None
    schedulers: list[torch.optim.lr_scheduler.LRScheduler] = field(default_factory=list)
    step: int = 0
    images_seen: int = 0
    seconds: float = 0.0
    losses: list[tuple[int, float]] = field(default_factory=list)


def make_state(
    model: nn.Module, lr: float, ema: bool | None = None, lr_lambda: Callable[[int], float] | None = None
) -> TrainState:
    """Optimizers (the family's own, or AdamW), an LR schedule and, where the family uses one, an EMA.

    `ema=None` takes the family's default (`model.use_ema`); the GAN keeps its generator EMA itself. `lr_lambda(step)`
    multiplies `lr` at each step (torch's `LambdaLR`); without it the LR is constant.
    """
    if hasattr(model, "configure_optimizers"):
        optimizers = model.configure_optimizers(lr)
    else:
        optimizers = [torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)]
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lr_lambda) for o in optimizers] if lr_lambda else []
    use_ema = getattr(model, "use_ema", False) if ema is None else ema
    if use_ema:
        from diffusers.training_utils import EMAModel  # imported here: it pulls in bitsandbytes, slow and chatty
    trainable = _trainable(model)
    # Warm-up EMA (decay 1 - (1 + step)^(-2/3)): useful after tens of steps, ~0.999 after tens of thousands.
    ema_model = EMAModel(trainable, use_ema_warmup=True, power=2 / 3, decay=0.9999) if use_ema else None
    return TrainState(optimizers, ema_model, schedulers)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _ema_swapped(state: TrainState) -> bool:
    """True after `fit` returned: the model holds the EMA weights and the EMA keeps the live ones aside."""
    return state.ema is not None and state.ema.temp_stored_params is not None


def _seeded(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63)


Batch = torch.Tensor | tuple[torch.Tensor, ...]
Data = Batch | Callable[[int, torch.Generator], Batch]


def _batch(data: Data, batch_size: int, seed: int, step: int) -> Batch:
    """The batch of `step`: drawn without replacement from tensors (a tuple's tensors share the indices), or made
    by `data(batch_size, generator)`; the generator is seeded by (seed, step) so a resumed run draws the same."""
    generator = torch.Generator().manual_seed(_seeded(seed, step))
    if callable(data):
        return data(batch_size, generator)
    tensors = data if isinstance(data, tuple) else (data,)
    index = torch.randperm(len(tensors[0]), generator=generator)[: min(batch_size, len(tensors[0]))]
    return tuple(t[index] for t in tensors) if isinstance(data, tuple) else data[index]


def _to(batch: Batch, device: torch.device) -> Batch:
    return tuple(t.to(device) for t in batch) if isinstance(batch, tuple) else batch.to(device)


def _size(batch: Batch) -> int:
    return len(batch[0]) if isinstance(batch, tuple) else len(batch)


def fit(
    model: nn.Module,
    data: Data,
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
    max_grad_norm: float | None = 1.0,
) -> FitResult:
    """Trains `model` on `data` until `budget` is spent; `model.loss(batch)` receives each batch as drawn.

    `data` is images (N, C, H, W), a tuple of tensors indexed together (images and labels: the batch is a tuple),
    or a function `(batch_size, generator) -> batch` for data made fresh every step. With an EMA, its weights are
    copied into the model at the end and the live weights are kept aside in `state.ema`: passing the same `state`
    again (or saving it with `save_checkpoint`) continues from the live ones. `state` (from `make_state`, possibly
    restored from a checkpoint) resumes a run and carries an LR schedule; `on_step(state)` runs after every step
    (the command line checkpoints and draws samples there). Gradients are clipped to `max_grad_norm` (None: not
    clipped).
    """
    if budget.images is None and budget.seconds is None and budget.steps is None:
        raise UserError("the training budget is empty: give images, seconds or steps")
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator()
    model.to(accelerator.device).train()
    data = data if callable(data) else _to(data, accelerator.device)
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
        x = _to(_batch(data, batch_size, seed, state.step), accelerator.device)
        torch.manual_seed(_seeded(seed + 1, state.step))  # the loss's noise, reproducible on resume
        with accelerator.autocast():
            terms = model.training_step(x, optimizers, state.step) if adversarial else model.loss(x)
        loss = float(terms["loss"].detach())
        if not math.isfinite(loss):  # stop before a non-finite gradient reaches the weights
            diverged = True
            break
        if not adversarial:
            accelerator.backward(terms["loss"])
            if max_grad_norm is not None:  # the families clip at 1: a stray batch cannot blow a run up
                accelerator.clip_grad_norm_(trainable, max_grad_norm)
            optimizers[0].step()
            optimizers[0].zero_grad(set_to_none=True)
        for scheduler in state.schedulers:
            scheduler.step()
        if state.ema is not None:
            state.ema.step(trainable)
        state.step += 1
        state.images_seen += _size(x)
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


# ----------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    output_dir: Path, model: nn.Module, state: TrainState, config: dict | None = None, total_limit: int | None = None
) -> Path:
    """`output_dir/checkpoint-{step}` through `core.checkpoint`: the whole state dict, optimizers, LR schedulers,
    the EMA and progress; `config` (the run's settings) is kept so that a resume can refuse a different model."""
    swapped = _ema_swapped(state)
    if swapped:  # save the live weights; the EMA ones are in the EMA state
        state.ema.restore(_trainable(model))
    try:
        progress = {"images_seen": state.images_seen, "seconds": state.seconds, "losses": state.losses}
        return checkpoint.save(
            output_dir, state.step, {"model": model}, state.optimizers, state.schedulers, progress=progress,
            extra={"ema": state.ema.state_dict()} if state.ema is not None else {}, config=config,
            total_limit=total_limit, trainable_only=False,
        )  # fmt: skip
    finally:
        if swapped:
            state.ema.store(_trainable(model))
            state.ema.copy_to(_trainable(model))


def load_checkpoint(folder: Path, model: nn.Module, state: TrainState) -> dict | None:
    """Restores what `save_checkpoint` wrote into `model` and `state`; returns the config the run was saved with."""
    info = checkpoint.load(folder, {"model": model}, state.optimizers, state.schedulers, trainable_only=False)
    if state.ema is not None:
        if "ema" not in info["extra"]:
            raise UserError(f"{folder} holds no EMA state, but this model trains with one")
        state.ema.load_state_dict(info["extra"]["ema"])
    progress = info["progress"]
    state.step, state.images_seen, state.seconds = info["step"], progress["images_seen"], progress["seconds"]
    state.losses = [tuple(pair) for pair in progress["losses"]]
    return info["config"]


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


# ----------------------------------------------------------------------------------------------- command line


@dataclass
class TrainConfig:
    """The settings of `difftune-train-baseline`: flags, or the same keys in a `--config` YAML file."""

    family: str = option("the family to train", choices=FAMILIES)
    output_dir: str = option("where checkpoints, sample grids, logs and the final model go")
    max_train_steps: int = option("optimizer steps to train for")
    shapes: bool = option("train on the embedded shapes world", False)
    train_data_dir: str | None = option("a folder of images (metadata.jsonl or image + .txt)", None)
    dataset_name: str | None = option("a datasets name or a local dataset folder", None)
    image_column: str = option("the dataset's image column", "image")
    caption_column: str = option("the dataset's caption column", "text")
    n_per_class: int = option("shapes world only: images per colour and shape", 100)
    resolution: int = option("image side in pixels", 32)
    channels: int | None = option("1 or 3; default: from the data", None)
    n_bits: int = option("bits per subpixel the data is quantised to", 8)
    seed: int = option("seeds the model, the batches and the noise", 0)
    batch_size: int = option("images per step", 32)
    learning_rate: float = option("AdamW's (or the family's optimizers') learning rate", 2e-4)
    mixed_precision: str = option("accelerate's mixed precision", "no", choices=("no", "fp16", "bf16"))
    checkpointing_steps: int = option("write checkpoint-N every N steps (and at the end)", 500)
    checkpoints_total_limit: int | None = option("keep only the newest N checkpoints", None)
    resume_from_checkpoint: str | None = option('"latest" (in output_dir) or a checkpoint folder', None)
    sample_every: int = option("write a sample grid every N steps (and at the end)", 500)
    log_every: int = option("log the loss every N steps", 10)
    set: list[str] = option("KEY=VALUE: a field of the family's Config; repeatable", [], repeatable=True)

    def validate(self) -> None:
        check_output_dir(self.output_dir)
        sources = [self.shapes, self.train_data_dir is not None, self.dataset_name is not None]
        if sum(sources) != 1:
            raise UserError("give exactly one data source: --shapes, --train_data_dir or --dataset_name")
        if self.channels not in (None, 1, 3):
            raise UserError(f"--channels {self.channels}: choose 1 or 3 (or leave it out: from the data)")
        for name in ("max_train_steps", "batch_size", "checkpointing_steps", "sample_every", "log_every"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.family == "gan" and self.mixed_precision == "fp16":
            raise UserError("--mixed_precision fp16 is not supported for the gan (no loss scaling); use bf16 or no")
        check_options(self.family, self.overrides())

    def overrides(self) -> dict:
        """`--set` as the family's Config options: values read as JSON where they parse (8, [32, 64], true)."""
        overrides = {}
        for pair in self.set:
            key, sep, value = pair.partition("=")
            if not sep:
                raise UserError(f"--set {pair!r} is not KEY=VALUE")
            try:
                overrides[key] = json.loads(value)
            except json.JSONDecodeError:
                overrides[key] = value  # a bare string such as loss=wgan-gp
        return overrides


# A checkpoint resumes only into the same model: these settings must match the ones it was saved with.
MODEL_KEYS = ("family", "resolution", "channels", "n_bits", "set")


def parse_args(argv: Sequence[str] | None) -> TrainConfig:
    return parse(TrainConfig, argv, "Train one baseline family.", prog="difftune-train-baseline")


def _resume(cfg: TrainConfig, model: nn.Module, state: TrainState, accelerator) -> None:
    folder = checkpoint.resolve(cfg.resume_from_checkpoint, Path(cfg.output_dir))
    if folder is None:
        accelerator.print(f"no checkpoint in {cfg.output_dir}; starting a new run")
        return
    # Checked before loading, so that the error names the setting rather than a tensor of another shape.
    # state.json is core.checkpoint's documented record of the run's config.
    saved = checkpoint.stored_config(folder) or {}
    differ = [k for k in MODEL_KEYS if k in saved and saved[k] != getattr(cfg, k)]
    if differ:
        raise UserError(
            f"--resume_from_checkpoint {folder}: it was trained with --{differ[0]} {saved[differ[0]]}, this run "
            f"asks for {getattr(cfg, differ[0])}; resume with the same model settings"
        )
    load_checkpoint(folder, model, state)
    accelerator.print(f"resumed from {folder} at step {state.step}")


def main(argv: Sequence[str] | None = None) -> None:
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    cfg = parse_args(argv)
    output_dir = Path(cfg.output_dir)
    data, _ = load_tensor(
        cfg.shapes, cfg.train_data_dir, cfg.dataset_name, cfg.resolution, cfg.channels, cfg.n_bits,
        None, cfg.image_column, cfg.caption_column, n_per_class=cfg.n_per_class, seed=cfg.seed,
    )  # fmt: skip
    channels = data.shape[1]
    torch.manual_seed(cfg.seed)  # the initial weights: the same command makes the same model
    model = build_model(cfg.family, cfg.resolution, channels, cfg.n_bits, **cfg.overrides())
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, log_with="tensorboard", project_dir=output_dir)
    if accelerator.num_processes > 1:
        raise UserError("baselines.train runs on one process; launch it without a multi-process accelerate config")
    accelerator.init_trackers("baselines", config={k: v for k, v in to_dict(cfg).items() if k != "set"})
    checkpoint.remove_stale(output_dir)
    state = make_state(model, cfg.learning_rate)
    if cfg.resume_from_checkpoint:
        _resume(cfg, model, state, accelerator)
    checkpoint.set_aside_later(output_dir, state.step)  # another run's later checkpoints: kept, never pruned
    bar = tqdm(total=cfg.max_train_steps, initial=state.step, disable=not accelerator.is_local_main_process)

    def on_log(step: int, terms: dict[str, float]) -> None:
        accelerator.log(terms, step=step)
        bar.set_postfix(loss=f"{terms['loss']:.4f}")

    def on_step(state: TrainState) -> None:
        bar.update(1)
        last = state.step == cfg.max_train_steps
        if state.step % cfg.checkpointing_steps == 0 or last:
            save_checkpoint(output_dir, model, state, to_dict(cfg), cfg.checkpoints_total_limit)
        if state.step % cfg.sample_every == 0 or last:
            write_samples(model, state, output_dir / "samples" / f"step-{state.step:06d}.png", cfg.seed)

    result = fit(
        model, data, batch_size=cfg.batch_size, lr=cfg.learning_rate, budget=Budget(steps=cfg.max_train_steps),
        seed=cfg.seed, accelerator=accelerator, log_every=cfg.log_every, on_log=on_log, state=state, on_step=on_step,
    )  # fmt: skip
    bar.close()
    if result.diverged:
        accelerator.print(f"stopped at step {result.steps}: the loss is no longer finite")
    save_model(output_dir, model, cfg.family, cfg.resolution, channels, cfg.n_bits)
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
    tensor_grid(x).save(path)


def cli() -> None:
    """The `difftune-train-baseline` command."""
    command(main)


if __name__ == "__main__":
    cli()
