"""The one training loop, shared by `finetune_lora.py` and `finetune_full.py`.

`train` reads top to bottom: prepare (accelerator, data, models, optimizer, resume), then
`for step ...: loss = objective(batch); backward; clip; step; log; checkpoint; validate`, then save. What differs
between tasks is data on the `Task` (`finetune.tasks`), what differs between model families is the `Family`
(`pipelines.families`), and the loss lives with the objective (`finetune.objective`): none of them is asked for
by name here.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from safetensors import SafetensorError
from tqdm.auto import tqdm

from difftune.core import checkpoint as ckpt
from difftune.core.config import to_dict
from difftune.core.errors import UserError
from difftune.core.files import atomic, reason
from difftune.finetune.buckets import BucketBatchSampler
from difftune.finetune.config import TrainConfig, check_family
from difftune.finetune.data import build_dataset, caches_text, check_pairs_fit, collate, read_images
from difftune.finetune.memory import apply_memory_options, places_itself
from difftune.finetune.objective import Objective, batch_loss
from difftune.finetune.offload import offload, offload_plan, resident
from difftune.finetune.optim import build_optimizer
from difftune.finetune.optimizer_steps import apply_step_options
from difftune.finetune.resume import apply_settings, check_resume, hyperparameters, resume_kinds, run_record
from difftune.finetune.speed import speed_up_denoiser
from difftune.finetune.tasks import Task, Trainable
from difftune.finetune.text_pass import run_text_pass, say_uncached_cost, text_device, uses_text_pass
from difftune.finetune.validation import edit_inputs, log_validation
from difftune.finetune.validation_loss import Selection, ValidationLoss, split_validation
from difftune.pipelines.families import Family, detect, read_model_index
from difftune.pipelines.families.base import given

logger = logging.getLogger(__name__)
RAW = "raw"  # <output_dir>/raw/: an adapter's own weights when its EMA is the output (--use_ema)
BEST = "best"  # <output_dir>/best/: the checkpoint of the lowest validation loss (--keep_best_by)
PROGRESS = "progress.json"  # <output_dir>/progress.json: step, length, loss and time left, for a watcher (the web app)
WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # the frozen weights' dtype by --mixed_precision


@dataclass
class Progress:
    step: int = 0
    epoch: int = 0
    batches_done_in_epoch: int = 0  # dataloader batches of `epoch` already consumed


@dataclass
class TrainResult:
    global_step: int
    losses: list[float] = field(default_factory=list)
    step_seconds: list[float] = field(default_factory=list)  # wall time of each optimizer step
    seconds: float = 0.0
    cached: bool = False
    is_main_process: bool = True
    validation_losses: list[tuple[int, float]] = field(default_factory=list)  # (step, loss) of each evaluation


@dataclass
class Run:
    """Everything `train` prepared, handed to the helpers that checkpoint, validate and save."""

    cfg: TrainConfig
    accelerator: Accelerator
    family: Family
    models: dict[str, torch.nn.Module]  # the trained modules, as accelerate prepared them
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: object | None
    max_steps: int
    weight_dtype: torch.dtype
    selection: Selection = field(default_factory=Selection)
    record: dict = field(default_factory=dict)  # what checkpoints store about this run (`finetune.resume`)
    hub_repo: str | None = None  # created before training when --push_to_hub


def train(cfg: TrainConfig, task: Task) -> TrainResult:
    accelerator = make_accelerator(cfg)
    # before any model: a bad folder fails in seconds
    data = read_images(cfg.data, cfg.dreambooth, class_images(cfg, accelerator), cfg.training.train_batch_size)
    data, held_out = split_validation(cfg.selection, cfg.data, cfg.training.seed, data)
    record = run_record(cfg, accelerator.num_processes, data.fingerprint(), len(data.images))
    folder, restart_epoch = find_checkpoint(cfg, record)  # a resume that cannot be honoured stops here
    model = cfg.model.pretrained_model_name_or_path
    family_cls = detect(model)
    check_family(cfg, family_cls.name, family_cls.pipeline_class_name, family_cls.objective)
    check_pairs_fit(family_cls, data, model)
    edits = edit_inputs(cfg, family_cls, held_out)  # an edit model's validation inputs
    if accelerator.is_main_process:  # checkpoints past the start are another run's: kept aside, never pruned
        ckpt.set_aside_later(Path(cfg.training.output_dir), ckpt.step_of(folder) if folder is not None else 0)
    accelerator.wait_for_everyone()
    hub_repo = prepare_hub(cfg, accelerator)
    prompts = [*data.captions, *(held_out.captions if held_out else []), *(cfg.validation.validation_prompt or [])]
    # the denoiser waits in CPU memory while the VAE and text encoders build the cache, and is placed once they left
    family, trainable, weight_dtype = load_models(cfg, task, accelerator, prompts, place_denoiser=False)
    with accelerator.main_process_first():
        more = held_out.captions if held_out else ()
        dataset, cached = build_dataset(cfg, data, family, trainable.models, more)
        validator = ValidationLoss.build(cfg, held_out, family, trainable.models) if held_out else None
    plan = offload_plan(
        list(family.text_encoders()), set(trainable.models), cached, dataset.text_embeddings is not None
    )
    offloaded = offload(family, plan, accelerator.device)  # cached: VAE and frozen encoders off the accelerator
    apply_memory_options(family.denoiser, cfg.memory, accelerator.device)
    sampler = BucketBatchSampler(dataset.buckets(), cfg.training.train_batch_size, cfg.training.seed)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.data.dataloader_num_workers
    )
    run, loader = prepare_optimization(cfg, accelerator, family, trainable, loader, weight_dtype)
    run.record, run.hub_repo = record, hub_repo
    progress = resume(run, folder, restart_epoch)
    if validator is not None and cfg.validation.validation_steps > run.max_steps and accelerator.is_main_process:
        logger.warning(
            "--validation_steps %d is more than the %d steps this run trains: the validation loss on the held-out "
            "images is computed once, at the last step", cfg.validation.validation_steps, run.max_steps,
        )  # fmt: skip
    objective = Objective.from_config(cfg.objective, family.noise_scheduler)
    logger.info(
        "training %s (%s): %d examples, %d steps, batch %d x %d accumulation x %d processes, cache %s",
        task.name, family.name, len(dataset), run.max_steps, cfg.training.train_batch_size, cfg.training.gradient_accumulation_steps,
        accelerator.num_processes, "on" if cached else "off",
    )  # fmt: skip
    result = TrainResult(progress.step, cached=cached, is_main_process=accelerator.is_main_process)
    # The bar is closed (its line ended) before any error line is printed, even when training stops early.
    with tqdm(total=run.max_steps, initial=progress.step, disable=not accelerator.is_local_main_process) as bar:
        start = tick = time.perf_counter()
        while progress.step < run.max_steps:
            # Not `set_epoch`: accelerate calls that on a loader's dataset and batch sampler with its own iteration count,
            # which restarts at 0 for every `skip_first_batches` loader (every epoch would replay epoch 0's order, noise,
            # timesteps and caption dropout).
            dataset.start_epoch(progress.epoch)
            sampler.start_epoch(progress.epoch)
            for batch in accelerator.skip_first_batches(loader, progress.batches_done_in_epoch):
                with accelerator.accumulate(*run.models.values()):
                    loss = batch_loss(family, run.models, batch, objective, weight_dtype)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.optim.max_grad_norm > 0:  # 0: no clipping
                        accelerator.clip_grad_norm_(run.params, cfg.optim.max_grad_norm)
                    run.optimizer.step()
                    run.lr_scheduler.step()
                    run.optimizer.zero_grad(set_to_none=True)
                progress.batches_done_in_epoch += 1
                if not accelerator.sync_gradients:
                    continue

                progress.step += 1
                step_loss = finite_loss(run, loss, progress.step)
                if run.ema is not None:
                    run.ema.step(run.params)
                result.losses.append(step_loss)
                tick, last = time.perf_counter(), tick
                result.step_seconds.append(tick - last)
                lr = run.lr_scheduler.get_last_lr()[0]
                bar.update(1)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
                accelerator.log({"train/loss": step_loss, "train/lr": lr}, step=progress.step)
                if accelerator.is_main_process:
                    write_progress(Path(cfg.training.output_dir), progress.step, run.max_steps, step_loss, result)
                if validator is not None and (
                    progress.step % cfg.validation.validation_steps == 0 or progress.step == run.max_steps
                ):
                    if validate_loss(run, validator, objective, progress, result):  # patience ran out: stop here
                        run.max_steps = progress.step
                if progress.step % cfg.checkpoints.checkpointing_steps == 0 or progress.step == run.max_steps:
                    save_checkpoint(run, progress)
                if cfg.validation.validation_prompt and progress.step % cfg.validation.validation_steps == 0:
                    with resident(family, offloaded, accelerator.device):
                        log_validation(family, run.models, accelerator, cfg, progress.step, weight_dtype, edits)
                if progress.step >= run.max_steps:
                    break
            else:  # the epoch ran out
                progress.epoch += 1
                progress.batches_done_in_epoch = 0
    result.global_step, result.seconds = progress.step, time.perf_counter() - start
    finish(run, task)
    return result


# ----------------------------------------------------------------------------------------------- preparing


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    output_dir = Path(cfg.training.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.training.gradient_accumulation_steps,
        mixed_precision=cfg.training.mixed_precision,
        log_with=None if cfg.training.report_to == "none" else cfg.training.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / cfg.training.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise UserError(
            f"{launched} processes launched but {accelerator.num_processes} joined; without CUDA launch with "
            "ACCELERATE_USE_CPU=1 (see configs/accelerate/multi_cpu.yaml)"
        )
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UserError(
            "--mixed_precision fp16 needs a GPU: on a CPU accelerate runs no fp16 autocast and the frozen weights "
            "would be cast to fp16 anyway; use --mixed_precision bf16 (autocast on CPU) or no"
        )
    set_seed(cfg.training.seed)
    if cfg.training.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        ckpt.remove_stale(output_dir)
    return accelerator


def find_checkpoint(cfg: TrainConfig, record: dict) -> tuple[Path | None, bool]:
    """The checkpoint to resume from, checked against this run before any model loads; returns it (None: start
    from step 0) and whether the interrupted epoch restarts (see `finetune.resume`)."""
    if not cfg.checkpoints.resume_from_checkpoint:
        return None, False
    folder = ckpt.resolve(cfg.checkpoints.resume_from_checkpoint, Path(cfg.training.output_dir))
    if folder is None:
        logger.info("no checkpoint in %s yet: starting from step 0", cfg.training.output_dir)
        return None, False
    allow = cfg.checkpoints.resume_allow_changes
    return folder, check_resume(folder, ckpt.stored_config(folder), record, allow, resume_kinds(type(cfg)))


def prepare_hub(cfg: TrainConfig, accelerator: Accelerator) -> str | None:
    """With --push_to_hub, the repository created or found before training (main process); None otherwise."""
    if not (cfg.hub.push_to_hub and accelerator.is_main_process):
        return None
    from difftune.finetune.hub import prepare_repo

    return prepare_repo(cfg.hub, Path(cfg.training.output_dir))


def class_images(cfg: TrainConfig, accelerator: Accelerator) -> list | None:
    if not cfg.dreambooth.with_prior_preservation:
        return None
    from difftune.finetune.dreambooth import ensure_class_images

    return ensure_class_images(cfg, accelerator)


def load_models(
    cfg: TrainConfig, task: Task, accelerator: Accelerator, prompts: Sequence[str] = (), place_denoiser: bool = True
) -> tuple[Family, Trainable, torch.dtype]:
    """The family's components, frozen; the task's part made trainable; everything placed and cast (the denoiser
    left in CPU memory unless `place_denoiser`: `finetune.memory.apply_memory_options` places it). A family with
    large text encoders first encodes `prompts` (every caption and validation prompt) with them alone, and loads
    the rest without them (`finetune.text_pass`)."""
    weight_dtype = WEIGHT_DTYPES.get(accelerator.mixed_precision, torch.float32)
    model = cfg.model.pretrained_model_name_or_path
    index = read_model_index(model)
    family_cls = detect(model, index)
    # a flag the family, the architecture or the launch cannot honour fails before loading
    check_family(cfg, family_cls.name, family_cls.pipeline_class_name, family_cls.objective)
    task.check(family_cls, cfg)
    cfg.memory.check_model(model, index, family_cls.denoiser_name)
    cfg.memory.check_run(accelerator.num_processes, accelerator.mixed_precision)
    family_cls.check_settings(model, index, given(cfg.model.family_options()))
    text = None
    if uses_text_pass(cfg, family_cls):
        with accelerator.main_process_first():
            text = run_text_pass(cfg, family_cls, model, index, list(prompts), accelerator.device, weight_dtype)
    denoiser = task.load_denoiser(family_cls, cfg, weight_dtype)
    family = family_cls.load(model, index, denoiser, cfg.model.family_options(), text_encoders=text is None)
    family.text_embeddings = text
    if family_cls.text_first and text is None:
        say_uncached_cost(family)
    quantized = denoiser is not None
    trainable = place_models(cfg, task, family, accelerator.device, weight_dtype, quantized, place_denoiser)
    speed_up_denoiser(family.denoiser, cfg.speed.compile, cfg.speed.compile_scope, cfg.speed.channels_last)
    return family, trainable, weight_dtype


def place_models(
    cfg: TrainConfig, task: Task, family: Family, device, weight_dtype, quantized: bool, place_denoiser: bool = True
) -> Trainable:
    """Freezes the family's modules, lets the task make its part trainable, and places and casts everything on
    `device`; `quantized`: the denoiser came quantised (its packed weights are never cast). The denoiser is placed
    by the memory options (`finetune.memory.apply_memory_options`: whole, or with blocks left in CPU memory), here
    or, without `place_denoiser`, by the caller once the cache is built. The memory planner (`finetune.planner`)
    places its meta-device models through this too."""
    for module in family.frozen_modules().values():
        module.requires_grad_(False)
        module.eval()
    trainable = task.setup(family, cfg)
    for module in trainable.models.values():
        module.train()
    trained_dtype = torch.bfloat16 if cfg.memory.full_bf16 else torch.float32
    text_devices = {}
    if caches_text(cfg, family, trainable.models):  # used once, for the cache: encoded on the CPU if too big here
        where = text_device(list(family.text_encoders().values()), torch.device(device))
        text_devices = dict.fromkeys(family.text_encoders(), where)
    for name, module in family.frozen_modules().items():
        if name == family.denoiser_name and quantized:  # never cast packed 4/8-bit weights
            for p in module.parameters():
                if p.requires_grad:
                    p.data = p.data.float()
        elif any(p.requires_grad for p in module.parameters()):  # trained weights stay fp32 (cast_training_params)
            for p in module.parameters():  # or bf16 with --full_bf16 (updates rounded stochastically)
                p.data = p.data.to(trained_dtype if p.requires_grad else weight_dtype)
            if name != family.denoiser_name:
                module.to(device)
        elif name == family.denoiser_name:  # cast where it was loaded; the memory options place it
            move(module, next(module.parameters()).device, weight_dtype)
        else:
            upcast = name == "vae" and family.vae.config.get("force_upcast", False)  # SDXL's VAE NaNs in fp16
            move(module, text_devices.get(name, device), torch.float32 if upcast else weight_dtype)
    if place_denoiser:
        apply_memory_options(family.denoiser, cfg.memory, device)
    return trainable


def move(module: torch.nn.Module, device, dtype: torch.dtype) -> None:
    """`module.to(device, dtype)`, casting only when the dtype changes (diffusers warns on every cast request)."""
    module.to(device)
    if next(module.parameters()).dtype != dtype:
        module.to(dtype)


def prepare_optimization(cfg, accelerator, family, trainable: Trainable, loader, weight_dtype) -> tuple[Run, object]:
    """Optimizer, LR schedule and EMA over the trainable parameters, all through `accelerator.prepare`."""
    from diffusers.optimization import get_scheduler

    params = [p for m in trainable.models.values() for p in m.parameters() if p.requires_grad]
    lr = cfg.optim.learning_rate
    if cfg.optim.scale_lr:
        lr *= cfg.training.gradient_accumulation_steps * cfg.training.train_batch_size * accelerator.num_processes
    optimizer = build_optimizer(cfg.optim, params, lr)
    apply_step_options(optimizer, cfg.memory.fused_backward_pass, cfg.memory.full_bf16, cfg.training.seed)
    updates_per_epoch = math.ceil(len(loader) / accelerator.num_processes / cfg.training.gradient_accumulation_steps)
    max_steps = cfg.training.max_train_steps or cfg.training.num_train_epochs * updates_per_epoch
    lr_scheduler = get_scheduler(
        cfg.optim.lr_scheduler, optimizer, num_warmup_steps=cfg.optim.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )  # fmt: skip
    names = list(trainable.models)
    placement = [not places_itself(m) for m in trainable.models.values()]  # a swapped denoiser stays split
    *prepared, optimizer, loader, lr_scheduler = accelerator.prepare(
        *trainable.models.values(), optimizer, loader, lr_scheduler, device_placement=[*placement, None, None, None]
    )
    ema = None
    if trainable.ema_decay is not None:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=trainable.ema_decay)
        ema.to(accelerator.device)
    models = dict(zip(names, prepared, strict=True))
    run = Run(cfg, accelerator, family, models, params, optimizer, lr_scheduler, ema, max_steps, weight_dtype)
    return run, loader


# ----------------------------------------------------------------------------------------------- during, after


def resume(run: Run, folder: Path | None, restart_epoch: bool) -> Progress:
    """The position to start from: step 0, or what the checkpoint `folder` restores (weights, optimizer moments,
    LR schedule position, EMA, RNG, and the position inside the epoch unless `restart_epoch`). This run's learning
    rate, schedule and optimizer settings replace the checkpoint's (`finetune.resume.apply_settings`)."""
    cfg = run.cfg
    if run.accelerator.is_main_process:  # the token is never logged
        run.accelerator.init_trackers("difftune", config={k: str(v) for k, v in to_dict(cfg).items()})
    if folder is None:
        return Progress()
    settings = hyperparameters(run.optimizer, run.lr_scheduler)
    state = ckpt.load(folder, run.models, [run.optimizer], [run.lr_scheduler], accelerator=run.accelerator)
    apply_settings(run.optimizer, run.lr_scheduler, *settings)
    if run.ema is not None:
        run.ema.load_state_dict(state["extra"]["ema"])
    run.selection = Selection(**state["extra"].get("selection", {}))
    progress = Progress(state["step"], **state["progress"])
    if restart_epoch:
        progress.batches_done_in_epoch = 0
    logger.info("resumed from %s at step %d (epoch %d, batch %d of it)", folder, progress.step, progress.epoch,
                progress.batches_done_in_epoch)  # fmt: skip
    if progress.step >= run.max_steps:
        logger.warning("%s is at step %d, this run trains %d steps: nothing left to train; saving the result",
                       folder, progress.step, run.max_steps)  # fmt: skip
    return progress


def finite_loss(run: Run, loss: torch.Tensor, step: int) -> float:
    """The step's loss averaged over processes; a non-finite one stops the run, naming the last good checkpoint."""
    value = run.accelerator.gather(loss.detach()).mean().item()
    if not math.isfinite(value):
        last = ckpt.list_checkpoints(Path(run.cfg.training.output_dir), verify=True)
        raise UserError(
            f"loss became {value} at step {step}; stopped. Last good checkpoint: {last[-1] if last else 'none'}. "
            "Lower --learning_rate or check the data"
        )
    return value


def write_progress(output_dir: Path, step: int, max_steps: int, loss: float, result: TrainResult) -> None:
    """`<output_dir>/progress.json`, replaced atomically every step: what a watcher cannot read from the tensorboard
    logs, the run's length in steps and the time left at the pace of this process's last 20 steps."""
    recent = result.step_seconds[-20:]
    left = (max_steps - step) * sum(recent) / len(recent)
    data = {"step": step, "max_steps": max_steps, "loss": loss, "seconds_left": round(left, 1)}
    with atomic(output_dir / PROGRESS) as tmp:
        tmp.write_text(json.dumps(data))


def save_checkpoint(run: Run, progress: Progress, name: str | None = None, notes: dict | None = None) -> None:
    cfg = run.cfg
    extra = {"selection": dataclasses.asdict(run.selection)}
    if run.ema is not None:
        extra["ema"] = run.ema.state_dict()
    saved = ckpt.save(
        Path(cfg.training.output_dir), progress.step, run.models, [run.optimizer], [run.lr_scheduler],
        progress={"epoch": progress.epoch, "batches_done_in_epoch": progress.batches_done_in_epoch},
        extra=extra, config=run.record, total_limit=cfg.checkpoints.checkpoints_total_limit,
        accelerator=run.accelerator, name=name, notes=notes,
    )  # fmt: skip
    if run.accelerator.is_main_process:
        logger.info("saved %s", saved)


def validate_loss(run: Run, validator: ValidationLoss, objective: Objective, progress: Progress, result) -> bool:
    """Scores the held-out images, logs the value, keeps `best/` when it improves; True when patience ran out."""
    value = validator.evaluate(run, objective)
    result.validation_losses.append((progress.step, value))
    run.accelerator.log({"validation/loss": value}, step=progress.step)
    if run.selection.update(progress.step, value) and run.cfg.selection.keep_best_by:
        note = {"step": progress.step, "validation_loss": value, "held_out_images": len(validator)}
        save_checkpoint(run, progress, name=BEST, notes={"best.json": note})
    stop = run.selection.patience_ran_out(run.cfg.selection.early_stopping_patience)
    if stop and run.accelerator.is_main_process:
        logger.info("early stopping at step %d: no better validation loss for %d evaluations (best %.5f at step %d)",
                    progress.step, run.selection.evals_since_best, run.selection.best_value, run.selection.best_step)  # fmt: skip
    return stop


def finish(run: Run, task: Task) -> None:
    """The trained modules (EMA weights where kept) back into the family, saved by the task, pushed if asked. With
    --early_stopping_patience the saved weights are the best checkpoint's; an adapter's raw weights (when the EMA
    is the output) are saved beside it under `raw/`."""
    accelerator = run.accelerator
    accelerator.wait_for_everyone()
    output_dir = Path(run.cfg.training.output_dir)
    if run.cfg.selection.early_stopping_patience and (output_dir / BEST).is_dir():
        ckpt.load_weights(output_dir / BEST, run.models, accelerator=accelerator)
        if run.ema is not None:
            run.ema.load_state_dict(ckpt.load_tree(output_dir / BEST, "extra")["ema"])
        logger.info("output: the best checkpoint (step %s)", run.selection.best_step)
    if accelerator.is_main_process:
        for name, model in run.models.items():
            run.family.parts[name] = accelerator.unwrap_model(model)
        try:
            if run.ema is not None:
                if task.raw_beside_ema:
                    task.save(run.family, run.cfg, output_dir / RAW)
                run.ema.copy_to(run.params)
            task.save(run.family, run.cfg, output_dir)
        except (OSError, SafetensorError) as err:  # a full disk at the very end: the last checkpoint holds the weights
            last = ckpt.list_checkpoints(output_dir)
            raise UserError(
                f"could not save the result in {output_dir} ({reason(err)}); nothing half-written was kept, the "
                f"trained weights are in {last[-1] if last else 'no checkpoint'}: free space and rerun with "
                "--resume_from_checkpoint latest (it saves the result without training again)"
            ) from None
        if run.cfg.hub.push_to_hub:
            from difftune.finetune.hub import push_to_hub

            push_to_hub(output_dir, run.cfg.hub, repo_id=run.hub_repo)
    accelerator.end_training()
