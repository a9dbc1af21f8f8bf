"""The one training loop, shared by `finetune_lora.py` and `finetune_full.py`.

A `Task` says what is trainable and how the result is saved; everything else (data, cache, objective,
accumulation, clipping, EMA, validation, checkpoints, resume) is here once. Read `train` top to bottom.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from finetune import checkpoint as ckpt
from finetune.config import TrainConfig, validate
from finetune.data import decode_all, read_records
from finetune.dataset import Example, TrainDataset, collate, crop_range, encode_captions, encode_images
from finetune.model import Components, freeze, load_components
from finetune.objective import diffusion_loss
from finetune.optim import build_optimizer
from finetune.validation import log_validation
from pipelines.errors import UserError

logger = logging.getLogger(__name__)


@dataclass
class Task:
    """What an entry script decides: which modules train (returned by `setup`) and how results are saved."""

    name: str
    setup: Callable[[Components, TrainConfig], dict[str, torch.nn.Module]]
    save: Callable[[Components, TrainConfig, Path, EMAModel | None], None]
    uses_ema: bool = False


@dataclass
class TrainResult:
    global_step: int
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    cached: bool = False


def sample_latents(params: torch.Tensor, seeds: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """Draws latents (B, C, h, w) from posterior params (B, 2C, h, w), each sample from its own seed."""
    mean, logvar = params.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = torch.stack(
        [torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(int(s) ^ 0x5EED)) for s in seeds]
    ).to(mean)
    return (mean + std * eps) * scaling_factor


def build_dataset(cfg: TrainConfig, comps: Components, device, dtype) -> tuple[TrainDataset, bool]:
    records = read_records(
        cfg.train_data_dir,
        cfg.dataset_name,
        cfg.image_column,
        cfg.caption_column,
        cfg.caption_extension,
        cfg.dataset_config_name,
    )
    images, records = decode_all(records)

    def tokenize(captions: list[str]) -> torch.Tensor:
        tok = comps.tokenizer
        return tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                   return_tensors="pt").input_ids  # fmt: skip

    cache_root = Path(cfg.cache_dir or Path(cfg.output_dir) / ".cache")
    random_crop = not cfg.center_crop and any(crop_range(im, cfg.resolution) != (0, 0) for im in images)
    cache_images = cfg.cache_latents and not random_crop
    if cfg.cache_latents and random_crop:
        logger.warning("latent cache off: random crops of non-square images differ every epoch (--center_crop)")
    if cache_images:
        comps.vae.to(device, dtype)
        params = encode_images(records, images, comps.vae, cfg.resolution, cfg.random_flip, cache_root)
        examples = [Example(p, pf, None, r.caption) for (p, pf), r in zip(params, records)]
    else:
        examples = [Example(None, None, im, r.caption) for im, r in zip(images, records)]
    text = None
    if cfg.cache_latents and not cfg.train_text_encoder:
        comps.text_encoder.to(device, dtype)
        text = encode_captions([r.caption for r in records] + [""], comps.text_encoder, tokenize, cache_root)
    dataset = TrainDataset(
        examples, cfg.resolution, cfg.seed, cfg.center_crop, cfg.random_flip, cfg.proportion_empty_prompts,
        text, tokenize,
    )  # fmt: skip
    return dataset, cache_images


def preflight(cfg: TrainConfig) -> None:
    """Every check that needs no model, run before anything is loaded: a bad setting costs seconds, not a run."""
    validate(cfg)
    if cfg.push_to_hub:
        from finetune.hub import resolve_token

        resolve_token(cfg)


def train(cfg: TrainConfig, task: Task) -> TrainResult:
    preflight(cfg)
    output_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / cfg.logging_dir)),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True),
    )
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(cfg.seed)
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    # Models: everything frozen, then the task makes its part trainable.
    comps = load_components(cfg.pretrained_model_name_or_path, cfg.prediction_type)
    freeze(comps.vae, comps.text_encoder, comps.unet)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    models = task.setup(comps, cfg)
    for model in models.values():
        model.train()
    if cfg.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
    frozen_dtype = weight_dtype if task.name == "lora" else torch.float32
    for module in (comps.vae, comps.text_encoder, comps.unet):
        if module not in models.values():
            module.to(accelerator.device, weight_dtype)
    if task.name == "lora":
        for p in comps.unet.parameters():
            p.data = p.data.to(torch.float32 if p.requires_grad else frozen_dtype)
    comps.unet.to(accelerator.device)

    # Data: decoded once; latents and text embeddings encoded once when their encoders are frozen.
    with accelerator.main_process_first():
        dataset, cached = build_dataset(cfg, comps, accelerator.device, weight_dtype)
    generator = torch.Generator().manual_seed(cfg.seed)
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=cfg.train_batch_size, shuffle=True, collate_fn=collate,
        num_workers=cfg.dataloader_num_workers, generator=generator,
    )  # fmt: skip

    params = [p for m in models.values() for p in m.parameters() if p.requires_grad]
    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr *= cfg.gradient_accumulation_steps * cfg.train_batch_size * accelerator.num_processes
    optimizer = build_optimizer(cfg, params, lr)
    updates_per_epoch = math.ceil(len(dataloader) / accelerator.num_processes / cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * updates_per_epoch
    lr_scheduler = get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=cfg.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )  # fmt: skip
    names = list(models)
    *prepared, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        *models.values(), optimizer, dataloader, lr_scheduler
    )
    models = dict(zip(names, prepared))
    ema = None
    if task.uses_ema and cfg.use_ema:
        unet = accelerator.unwrap_model(models["unet"])
        ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, model_cls=type(unet), model_config=unet.config)
        ema.to(accelerator.device)

    state = ckpt.TrainerState()
    if cfg.resume_from_checkpoint:
        folder = ckpt.resolve(cfg.resume_from_checkpoint, output_dir)
        if folder is None:
            logger.info("no checkpoint in %s yet: starting from step 0", output_dir)
        else:
            unwrapped = {k: accelerator.unwrap_model(m) for k, m in models.items()}
            state = ckpt.load_checkpoint(folder, unwrapped, optimizer, lr_scheduler, ema)
            logger.info("resumed from %s at step %d", folder, state.global_step)
    if accelerator.is_main_process:
        tracked = {k: str(v) for k, v in asdict(cfg).items() if k != "hub_token"}  # the token is never logged
        accelerator.init_trackers("difftune", config=tracked)

    def compute_loss(batch: dict) -> torch.Tensor:
        seeds = batch["noise_seed"].cpu()
        if "latents" in batch:
            posterior = batch["latents"]
        else:
            posterior = comps.vae.encode(batch["pixels"].to(weight_dtype)).latent_dist.parameters
        latents = sample_latents(posterior.float(), seeds, comps.vae.config.scaling_factor).to(weight_dtype)
        if "encoder_hidden_states" in batch:
            hidden = batch["encoder_hidden_states"].to(weight_dtype)
        else:
            hidden = models.get("text_encoder", comps.text_encoder)(batch["input_ids"])[0]
        return diffusion_loss(
            models["unet"], comps.noise_scheduler, latents, hidden, seeds,
            cfg.noise_offset, cfg.input_perturbation, cfg.snr_gamma,
        )  # fmt: skip

    logger.info(
        "training %s: %d examples, %d steps, batch %d x %d accumulation x %d processes, cache %s",
        task.name, len(dataset), max_steps, cfg.train_batch_size, cfg.gradient_accumulation_steps,
        accelerator.num_processes, "on" if cached else "off",
    )  # fmt: skip
    result = TrainResult(global_step=state.global_step, cached=cached)
    progress = tqdm(total=max_steps, initial=state.global_step, disable=not accelerator.is_local_main_process)
    start = time.time()
    while state.global_step < max_steps:
        dataset.set_epoch(state.epoch)
        dataloader.set_epoch(state.epoch)
        batches = accelerator.skip_first_batches(dataloader, state.batches_done_in_epoch)
        for batch in batches:
            with accelerator.accumulate(*models.values()):
                loss = compute_loss(batch)
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state.batches_done_in_epoch += 1
            if not accelerator.sync_gradients:
                continue

            state.global_step += 1
            step_loss = accelerator.gather(loss.detach()).mean().item()
            if not math.isfinite(step_loss):
                last = ckpt.list_checkpoints(output_dir)
                raise UserError(
                    f"loss became {step_loss} at step {state.global_step}; stopped. Last good checkpoint: "
                    f"{last[-1] if last else 'none'}. Lower --learning_rate or check the data"
                )
            if ema is not None:
                ema.step(accelerator.unwrap_model(models["unet"]).parameters())
            result.losses.append(step_loss)
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
            accelerator.log({"train/loss": step_loss, "train/lr": lr_scheduler.get_last_lr()[0]}, step=state.global_step)

            if state.global_step % cfg.checkpointing_steps == 0 or state.global_step == max_steps:
                accelerator.wait_for_everyone()
                if accelerator.is_main_process:
                    unwrapped = {k: accelerator.unwrap_model(m) for k, m in models.items()}
                    saved = ckpt.save_checkpoint(
                        output_dir, state, unwrapped, optimizer, lr_scheduler, ema, cfg.checkpoints_total_limit
                    )
                    logger.info("saved %s", saved)
            if cfg.validation_prompt and state.global_step % cfg.validation_steps == 0 and accelerator.is_main_process:
                log_validation(comps, accelerator, cfg, state.global_step, weight_dtype)
            if state.global_step >= max_steps:
                break
        else:  # the epoch ran out
            state.epoch += 1
            state.batches_done_in_epoch = 0
    progress.close()
    result.global_step = state.global_step
    result.seconds = time.time() - start

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        for name, model in models.items():
            setattr(comps, name, accelerator.unwrap_model(model))
        task.save(comps, cfg, output_dir, ema)
    accelerator.end_training()
    return result
