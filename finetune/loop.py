"""The one training loop, shared by `finetune_lora.py` and `finetune_full.py`.

A `Task` says what is trainable and how the result is saved; everything else (data, cache, objective,
accumulation, clipping, EMA, validation, checkpoints, resume) is here once. Read `train` top to bottom.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from core.errors import UserError
from finetune import checkpoint as ckpt
from finetune.buckets import BucketBatchSampler, assign_bucket, can_move, make_buckets
from finetune.config import TrainConfig, parse_config, validate
from finetune.data import decode_all, read_records
from finetune.dataset import (
    Augment,
    Example,
    TrainDataset,
    collate,
    encode_captions,
    encode_images,
    fingerprint_module,
)
from finetune.model import Components, freeze, load_components
from finetune.objective import diffusion_loss, timestep_bias_weights
from finetune.optim import build_optimizer, validate_optim
from finetune.validation import log_validation

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
    is_main_process: bool = True


def sample_latents(params: torch.Tensor, seeds: torch.Tensor, scaling_factor: float) -> torch.Tensor:
    """Draws latents (B, C, h, w) from posterior params (B, 2C, h, w), each sample from its own seed."""
    mean, logvar = params.chunk(2, dim=1)
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    eps = torch.stack(
        [torch.randn(mean.shape[1:], generator=torch.Generator().manual_seed(int(s) ^ 0x5EED)) for s in seeds]
    ).to(mean)
    return (mean + std * eps) * scaling_factor


@dataclass
class Images:
    """Decoded training images with their captions and buckets, read before any model is loaded."""

    records: list
    images: list
    captions: list[str]
    buckets: list[tuple[int, int]]
    is_prior: list[bool]


def read_images(cfg: TrainConfig, class_records: list | None = None) -> Images:
    records = read_records(
        cfg.train_data_dir, cfg.dataset_name, cfg.image_column, cfg.caption_column, cfg.caption_extension,
        cfg.dataset_config_name, require_captions=cfg.instance_prompt is None,
    )  # fmt: skip
    images, records = decode_all(records)
    captions = [cfg.instance_prompt or r.caption for r in records]
    is_prior = [False] * len(records)
    if class_records:
        class_images, class_records = decode_all(class_records)
        records, images = records + class_records, images + class_images
        captions += [r.caption or cfg.class_prompt for r in class_records]
        is_prior += [True] * len(class_records)
    if cfg.enable_bucket:
        table = make_buckets(cfg.resolution, cfg.min_bucket_reso, cfg.max_bucket_reso, cfg.bucket_reso_steps)
        buckets = [
            assign_bucket(im.size, table, cfg.resolution, cfg.bucket_reso_steps, cfg.bucket_no_upscale)
            for im in images
        ]
        counts = Counter(buckets)
        if cfg.train_batch_size > max(counts.values()):
            raise UserError(
                f"--train_batch_size {cfg.train_batch_size} is larger than every bucket (the largest, "
                f"{max(counts, key=counts.get)}, holds {max(counts.values())} images); lower the batch size"
            )
        logger.info("buckets (w, h): images = %s", dict(sorted(counts.items())))
    else:
        buckets = [(cfg.resolution, cfg.resolution)] * len(images)
    return Images(records, images, captions, buckets, is_prior)


def build_dataset(cfg: TrainConfig, data: Images, comps: Components, device, dtype) -> tuple[TrainDataset, bool]:
    cache_root = Path(cfg.cache_dir or Path(cfg.output_dir) / ".cache")
    random_crop = not cfg.center_crop and any(
        can_move(im.size, b) for im, b in zip(data.images, data.buckets, strict=True)
    )
    cache_images = cfg.cache_latents and not random_crop
    if cfg.cache_latents and random_crop:
        logger.warning("latent cache off: random crops differ every epoch (use --center_crop to cache)")
    examples = [
        Example(caption, im.size, bucket, is_prior=prior)
        for im, caption, bucket, prior in zip(data.images, data.captions, data.buckets, data.is_prior, strict=True)
    ]
    if cache_images:
        vae_dtype = torch.float32 if comps.vae.config.get("force_upcast", False) else dtype  # SDXL VAE NaNs in fp16
        comps.vae.to(device, vae_dtype)
        params = encode_images(data.records, data.images, data.buckets, comps.vae, cfg.random_flip, cache_root)
        for ex, (p, pf) in zip(examples, params, strict=True):
            ex.latents, ex.latents_flipped = p, pf
    else:
        for ex, im in zip(examples, data.images, strict=True):
            ex.image = im
    text = None
    if cfg.cache_latents and not cfg.train_text_encoder and not cfg.shuffle_caption:
        for te in comps.text_encoders():
            te.to(device, dtype)
        fingerprint = "".join(fingerprint_module(te) for te in comps.text_encoders())
        text = encode_captions(data.captions + [""], comps.encode_text, fingerprint, comps.tokenize, cache_root)
    aug = Augment(
        cfg.seed, cfg.center_crop, cfg.random_flip, cfg.proportion_empty_prompts, cfg.shuffle_caption,
        cfg.keep_tokens, cfg.prior_loss_weight,
    )  # fmt: skip
    return TrainDataset(examples, cfg.repeats, aug, text, comps.tokenize), cache_images


def preflight(cfg: TrainConfig, task: Task) -> None:
    """Every check that needs no model, run before anything is loaded: a bad setting costs seconds, not a run."""
    validate(cfg)
    validate_optim(cfg)
    if cfg.quantize_base and task.name != "lora":
        raise UserError("--quantize_base is for LoRA: full fine-tuning trains the UNet's own weights")
    if cfg.push_to_hub:
        from finetune.hub import resolve_token

        resolve_token(cfg)


def train(cfg: TrainConfig, task: Task) -> TrainResult:
    preflight(cfg, task)
    output_dir = Path(cfg.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        mixed_precision=cfg.mixed_precision,
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / cfg.logging_dir)
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
    set_seed(cfg.seed)
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)

    # Data first: a bad folder should fail in seconds, before any model is loaded.
    class_records = None
    if cfg.with_prior_preservation:
        from finetune.dreambooth import ensure_class_images

        class_records = ensure_class_images(cfg, accelerator)
    data = read_images(cfg, class_records)

    # Models: everything frozen, then the task makes its part trainable.
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    unet = None
    if cfg.quantize_base:
        from finetune.quantize import load_quantized_unet

        unet = load_quantized_unet(cfg.pretrained_model_name_or_path, cfg.quantize_base, weight_dtype)
    comps = load_components(cfg.pretrained_model_name_or_path, cfg.prediction_type, cfg.rescale_betas_zero_snr, unet)
    freeze(comps.vae, comps.unet, *comps.text_encoders())
    models = task.setup(comps, cfg)
    for model in models.values():
        model.train()
    if cfg.gradient_checkpointing:
        comps.unet.enable_gradient_checkpointing()
    frozen_dtype = weight_dtype if task.name == "lora" else torch.float32
    for module in (comps.vae, *comps.text_encoders(), *([] if cfg.quantize_base else [comps.unet])):
        if not any(module is m for m in models.values()):
            module.to(accelerator.device, weight_dtype)
    if task.name == "lora":  # trained adapter weights stay fp32 (diffusers' cast_training_params)
        for module in (comps.unet, *comps.text_encoders()):
            for p in module.parameters():
                if p.requires_grad or not cfg.quantize_base:  # never cast packed 4/8-bit weights
                    p.data = p.data.to(torch.float32 if p.requires_grad else frozen_dtype)
    if not cfg.quantize_base:
        comps.unet.to(accelerator.device)

    # Data: decoded once; latents and text embeddings encoded once when their encoders are frozen.
    with accelerator.main_process_first():
        dataset, cached = build_dataset(cfg, data, comps, accelerator.device, weight_dtype)
    sampler = BucketBatchSampler(dataset.buckets(), cfg.train_batch_size, cfg.seed)
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate, num_workers=cfg.dataloader_num_workers
    )

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
    models = dict(zip(names, prepared, strict=True))
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

    timestep_weights = timestep_bias_weights(cfg, comps.noise_scheduler.config.num_train_timesteps)

    def compute_loss(batch: dict) -> torch.Tensor:
        seeds = batch["noise_seed"].cpu()
        if "latents" in batch:
            posterior = batch["latents"]
        else:
            posterior = comps.vae.encode(batch["pixels"].to(weight_dtype)).latent_dist.parameters
        latents = sample_latents(posterior.float(), seeds, comps.vae.config.scaling_factor).to(weight_dtype)
        if "encoder_hidden_states" in batch:
            cond = {k: batch[k] for k in ("encoder_hidden_states", "text_embeds") if k in batch}
        else:
            encoders = [
                models.get("text_encoder", comps.text_encoder),
                models.get("text_encoder_2", comps.text_encoder_2),
            ]
            cond = comps.encode_text(batch, encoders)
        unet_kwargs = {}
        if comps.family == "sdxl":
            unet_kwargs["added_cond_kwargs"] = {"text_embeds": cond["text_embeds"].to(weight_dtype),
                                                "time_ids": batch["time_ids"].to(weight_dtype)}  # fmt: skip
        per_sample = diffusion_loss(
            models["unet"], comps.noise_scheduler, latents, cond["encoder_hidden_states"].to(weight_dtype), seeds,
            cfg.noise_offset, cfg.input_perturbation, cfg.snr_gamma, unet_kwargs, reduce=False,
            timestep_weights=timestep_weights,
        )  # fmt: skip
        return (per_sample * batch["weight"].to(per_sample)).mean()

    logger.info(
        "training %s: %d examples, %d steps, batch %d x %d accumulation x %d processes, cache %s",
        task.name, len(dataset), max_steps, cfg.train_batch_size, cfg.gradient_accumulation_steps,
        accelerator.num_processes, "on" if cached else "off",
    )  # fmt: skip
    result = TrainResult(global_step=state.global_step, cached=cached, is_main_process=accelerator.is_main_process)
    progress = tqdm(total=max_steps, initial=state.global_step, disable=not accelerator.is_local_main_process)
    start = time.time()
    while state.global_step < max_steps:
        dataset.set_epoch(state.epoch)
        sampler.set_epoch(state.epoch)  # accelerate's shard wrapper does not forward set_epoch to it
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
            accelerator.log(
                {"train/loss": step_loss, "train/lr": lr_scheduler.get_last_lr()[0]}, step=state.global_step
            )

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


def run_task(argv, task: Task, description: str) -> TrainResult:
    """An entry script's whole `main`: flags and --config files, then training; the main process reports."""
    cfg = parse_config(argv, TrainConfig, description)
    result = train(cfg, task)
    if result.is_main_process:
        what = "LoRA" if task.name == "lora" else "pipeline"
        print(f"trained {result.global_step} steps in {result.seconds:.1f}s; {what} saved in {cfg.output_dir}")
    return result
