"""The training step of a run, assembled from the product's own parts without data or weights, and its memory.

`build_run` does what the loop's preparation does (`finetune.loop.place_models`, the task's adapter, the optimizer
of `finetune.optim`, the EMA, the dataset's batch through `finetune.data.TrainDataset` and `collate`), with every
part built from its config (`finetune.plan_models`) on the meta device, or on the CPU for measuring. `train_step`
is the loop's step: `finetune.objective.batch_loss`, backward, clipping, the optimizer step. `trace_run` runs it
on meta tensors under `finetune.memtrace`'s modes and returns the peak of each phase, with its breakdown:

- the training step (steady state: the optimizer's state exists; with gradient accumulation, the gradients of one
  micro-batch are alive through the next one's forward and backward);
- validation images (`--validation_prompt`): every part resident, a guided denoiser call on the images' latents
  and the VAE decoding them, without gradients;
- caching, before training: every part but the denoiser on the device (the loop places the denoiser once the
  cache is built) while the VAE encodes a batch of images for the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field

import torch
from PIL import Image

from difftune.core.errors import UserError
from difftune.finetune.config import TrainConfig, check_family
from difftune.finetune.data import Augment, Example, TrainDataset, collate
from difftune.finetune.loop import WEIGHT_DTYPES, place_models
from difftune.finetune.memory import SWAP_ATTRIBUTE, in_cpu_memory
from difftune.finetune.memtrace import (
    ACTIVATIONS,
    FastMeta,
    LiveBytes,
    Snapshot,
    TargetDevice,
    autocast_forward,
    recompute_on_target,
)
from difftune.finetune.objective import Objective, batch_loss
from difftune.finetune.offload import offload_plan
from difftune.finetune.optim import build_optimizer, optimizer_name
from difftune.finetune.optimizer_steps import apply_step_options
from difftune.finetune.plan_models import STAND_IN_OPTIMIZERS, check_configs, make_part, quantize_stand_in
from difftune.finetune.tasks import Task
from difftune.finetune.text_pass import fits_beside
from difftune.pipelines.families import detect, read_model_index
from difftune.pipelines.families.base import component_class

TRAINABLE, GRADIENTS, OPTIMIZER, EMA = "trainable weights", "gradients", "optimizer state", "EMA weights"
BATCH, SWAP = "batch", "swap buffers (swapped blocks on the device)"
ALWAYS_SHOWN = (TRAINABLE, GRADIENTS, OPTIMIZER, ACTIVATIONS)  # in a plan's breakdown, even when none is alive
DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.uint8: "uint8",
               torch.int8: "int8", torch.float8_e4m3fn: "fp8", torch.int64: "int64"}  # fmt: skip
Autocast = Callable[[torch.dtype | None], AbstractContextManager]


@dataclass
class Run:
    """A run's models, optimizer and one batch, placed as the training loop places them."""

    cfg: TrainConfig
    family: object
    models: dict[str, torch.nn.Module]
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    ema: object | None
    objective: Objective
    batch: dict
    weight_dtype: torch.dtype
    offloaded: list[str]  # parts kept off the accelerator while training (cached inputs)
    latents_cached: bool
    text_cached: bool


def weight_dtype_of(cfg: TrainConfig) -> torch.dtype:
    return WEIGHT_DTYPES.get(cfg.training.mixed_precision or "no", torch.float32)


def build_run(
    cfg: TrainConfig, task: Task, device: str, autocast: Autocast, device_type: str = "cuda", weights: bool = False
) -> Run:
    """`cfg`'s models on `device` ("meta", or "cpu" with random weights, or with the saved ones: `weights`), placed
    by the loop's own code, the trained ones' forward under `autocast` as accelerate wraps them, the optimizer and a
    batch of zeros."""
    model = cfg.model.pretrained_model_name_or_path
    index = read_model_index(model)
    family_cls = detect(model, index)
    check_family(cfg, family_cls.name, family_cls.pipeline_class_name, family_cls.objective)
    if family_cls.max_controls:
        raise UserError(
            f"the memory planner does not model an edit model's control images yet ({family_cls.pipeline_class_name}): "
            "drop --plan/--fit"
        )
    task.check(family_cls, cfg)
    check_configs(model, index, family_cls)
    cfg.memory.check_model(model, index, family_cls.denoiser_name)
    cfg.memory.check_run(1, cfg.training.mixed_precision)
    weight_dtype = weight_dtype_of(cfg)
    latents_cached = cfg.cache.cache_latents
    # the planner assumes the data lets the cache work (images of their bucket's shape, or --center_crop)
    text_cached = latents_cached and not cfg.data.shuffle_caption and not cfg.model.train_text_encoder
    build = make_part(model, device, weights)
    denoiser = None
    if cfg.memory.quantize_base is not None:
        name = family_cls.denoiser_name
        denoiser = quantize_stand_in(build(name, component_class(index, name, model)), cfg.memory.quantize_base,
                                     weight_dtype)  # fmt: skip
    family = family_cls.load(model, index, denoiser, cfg.model.family_options(), make_part=build)
    trainable = place_models(cfg, task, family, torch.device(device), weight_dtype, quantized=denoiser is not None)
    for module in trainable.models.values():
        autocast_forward(module, autocast, weight_dtype)
    offloaded = offload_plan(list(family.text_encoders()), set(trainable.models), latents_cached, text_cached)
    params = [p for m in trainable.models.values() for p in m.parameters() if p.requires_grad]
    batch = example_batch(cfg, family, latents_cached, text_cached, device)
    ema = None
    if trainable.ema_decay is not None:
        from diffusers.training_utils import EMAModel

        ema = EMAModel(params, decay=trainable.ema_decay)
    objective = Objective.from_config(cfg.objective, family.noise_scheduler)
    optimizer = make_optimizer(cfg, params, device_type)
    return Run(cfg, family, trainable.models, params, optimizer, ema, objective, batch, weight_dtype, offloaded,
               latents_cached, text_cached)  # fmt: skip


def make_optimizer(cfg: TrainConfig, params: list, device_type: str) -> torch.optim.Optimizer:
    """`finetune.optim.build_optimizer`'s optimizer; a stand-in of the same memory for those whose step needs CUDA
    or reads values. AdamW takes the implementation torch picks on the device (for-each on CUDA)."""
    lr = cfg.optim.learning_rate
    name = optimizer_name(cfg.optim)
    if name in STAND_IN_OPTIMIZERS:
        return STAND_IN_OPTIMIZERS[name](params, lr=lr)
    optimizer = build_optimizer(cfg.optim, params, lr)
    if name == "adamw" and not cfg.optim.fused_optimizer:
        for group in optimizer.param_groups:  # torch picks for-each on CUDA; the meta device would not
            group["foreach"] = device_type == "cuda"
    memory = cfg.memory
    apply_step_options(optimizer, memory.fused_backward_pass, memory.full_bf16, cfg.training.seed)
    return optimizer


def latent_shape(family, resolution: int) -> tuple[int, int, int]:
    """(C, h, w) of a square image's latents: the VAE's channels and downsampling, as diffusers' pipelines read
    them (`vae_scale_factor`)."""
    config = family.vae.config
    if "temperal_downsample" in config:  # a 3D video VAE (Qwen-Image's): one halving per level, z_dim channels
        factor = 2 ** len(config.temperal_downsample)
        return config.z_dim, resolution // factor, resolution // factor
    factor = 2 ** (len(config.block_out_channels) - 1)
    return config.latent_channels, resolution // factor, resolution // factor


def example_batch(cfg: TrainConfig, family, latents_cached: bool, text_cached: bool, device: str) -> dict:
    """A batch of `--train_batch_size` square images at `--resolution`, from the product's dataset and collate:
    cached posteriors or pixels, cached text conditioning or token ids, as the loader gives them on the device
    (the noise seeds stay on the CPU, where `batch_loss` reads them)."""
    res, size = cfg.data.resolution, cfg.training.train_batch_size
    c, h, w = latent_shape(family, res)
    if latents_cached:
        examples = [Example("", (res, res), (res, res), latents=torch.zeros(2 * c, h, w)) for _ in range(size)]
    else:
        examples = [Example("", (res, res), (res, res), image=Image.new("RGB", (res, res))) for _ in range(size)]
    text = None
    if text_cached:
        with torch.no_grad():
            cond = family.encode_text(family.tokenize([""]))
        text = {"": {k: torch.zeros(tuple(v.shape[1:])) for k, v in cond.items()}}
    aug = Augment(cfg.training.seed, True, False, 0.0, False, 0, cfg.dreambooth.prior_loss_weight)
    dataset = TrainDataset(examples, 1, aug, text, family.tokenize)
    batch = collate([dataset[i] for i in range(size)])
    return {k: v if k == "noise_seed" else _to(v, device) for k, v in batch.items()}


def _to(value, device: str):
    return {k: _to(v, device) for k, v in value.items()} if isinstance(value, dict) else value.to(device)


def init_optimizer_state(run: Run) -> None:
    """One optimizer step on zero gradients: the optimizer's state exists afterwards, as after a first step."""
    for p in run.params:
        p.grad = torch.zeros_like(p)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)


def train_step(run: Run, phase: Callable[[str], AbstractContextManager] = lambda _: nullcontext(),
               after_forward: Callable[[], None] | None = None) -> None:  # fmt: skip
    """The loop's optimizer step: forward (`batch_loss`), backward, and with gradient accumulation a second
    micro-batch while the first one's gradients are kept; then clipping, the optimizer step and the EMA."""
    accumulation = run.cfg.training.gradient_accumulation_steps
    for _ in range(min(accumulation, 2)):  # from the second micro-batch on, every one looks alike
        with phase("forward"):
            loss = batch_loss(run.family, run.models, run.batch, run.objective, run.weight_dtype)
        if after_forward is not None:
            after_forward()
        with phase("backward"):
            (loss / accumulation).backward()  # accelerate scales the loss by the accumulation steps
        del loss
    with phase("optimizer step"):
        if run.cfg.optim.max_grad_norm > 0:  # 0: no clipping
            torch.nn.utils.clip_grad_norm_(run.params, run.cfg.optim.max_grad_norm)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        if run.ema is not None:
            run.ema.step(run.params)


@dataclass
class Trace:
    """What `trace_run` found: each phase's peak, and the activations kept for backward after the forward."""

    run: Run
    phases: dict[str, Snapshot] = field(default_factory=dict)
    kept_for_backward: int = 0  # bytes alive after the forward beyond those alive before it
    kept_other: int | None = None  # the same with the other --gradient_checkpointing setting
    before_step: int = 0  # bytes alive when training starts: weights, the batch, the EMA

    @property
    def peak(self) -> Snapshot:
        return max(self.phases.values(), key=lambda s: s.total)


def trace_run(
    cfg: TrainConfig, task: Task, device_type: str = "cuda", detail: bool = True, card: float | None = None
) -> Trace:
    """The peak memory of `cfg`'s training step, caching and validation images, traced on meta tensors for a
    `device_type` ("cuda" or "cpu") accelerator of `card` bytes (None: unlimited); `detail` adds the activations the
    other gradient checkpointing setting would keep."""
    target = TargetDevice(device_type)
    with FastMeta():
        run = build_run(cfg, task, "meta", target.autocast, device_type)
    recompute_on_target(run.family.denoiser, target)
    live = LiveBytes()
    trace = Trace(run)
    name = run.family.denoiser_name
    with live, target:
        frozen = run.family.frozen_modules()
        count_weights(live, {n: m for n, m in frozen.items() if n not in run.offloaded and n != name}, name)
        count_swap_copies(live, run.family.denoiser)
        for v in run.batch.values():
            for t in v.values() if isinstance(v, dict) else [v]:
                live.track(t, BATCH)
        if run.latents_cached:  # the denoiser waits in CPU memory meanwhile (`finetune.loop.train`)
            trace.phases["caching"] = trace_caching(live, run, target, card)
        count_weights(live, {name: run.family.denoiser}, name)
        if run.ema is not None:
            for t in run.ema.shadow_params:
                live.track(t, EMA)
        live.reset_peak()
        trace.before_step = live.total
        with live.tagged(GRADIENTS, "optimizer step"):
            init_optimizer_state(run)
        for state in run.optimizer.state.values():
            for t in state.values():
                live.track(t, OPTIMIZER)
        for p in run.params:
            p.register_post_accumulate_grad_hook(lambda p: p.grad is not None and live.retag(p.grad, GRADIENTS))
        before = live.total

        def after_forward():
            trace.kept_for_backward = max(trace.kept_for_backward, live.total - before)

        train_step(run, lambda name: live.tagged(ACTIVATIONS, name), after_forward)
        trace.phases["training step"] = live.peak
        if run.cfg.validation.validation_prompt:
            trace.phases["validation images"] = trace_validation(live, run, target)
        if detail:
            trace.kept_other = kept_with_other_checkpointing(live, run, target)
    return trace


def count_swap_copies(live: LiveBytes, denoiser: torch.nn.Module) -> None:
    """Block swap (`finetune.block_swap`): the copies that bring the swapped blocks onto the device are counted as
    swap buffers while they are there (their resting tensors, in CPU memory, never are: `count_weights`)."""
    swap = getattr(denoiser, SWAP_ATTRIBUTE, None)
    if swap is None:
        return
    copy = swap._copy

    def counted_copy(i: int):
        with live.tagged(SWAP):
            return copy(i)

    swap._copy = counted_copy


def kept_with_other_checkpointing(live: LiveBytes, run: Run, target: TargetDevice) -> int | None:
    """The activations a forward keeps for backward with gradient checkpointing switched the other way (None: block
    swap needs it on)."""
    if run.cfg.memory.blocks_to_swap:
        return None
    denoiser = run.family.denoiser
    if run.cfg.memory.gradient_checkpointing:
        denoiser.disable_gradient_checkpointing()
    else:
        denoiser.enable_gradient_checkpointing()
        recompute_on_target(denoiser, target)
    before = live.total
    loss = batch_loss(run.family, run.models, run.batch, run.objective, run.weight_dtype)
    kept = live.total - before
    del loss
    return kept


def count_weights(live: LiveBytes, modules: dict[str, torch.nn.Module], denoiser_name: str) -> None:
    """Every parameter and buffer of `modules` on the device, under the category of its part and dtype (trainable:
    its own); a swapped block's, in CPU memory between uses, is counted only while its copy is on the device."""
    for name, module in modules.items():
        part = "denoiser" if name == denoiser_name else name
        away = in_cpu_memory(module)
        for t in [*module.parameters(), *module.buffers()]:
            if id(t) in away:
                continue
            category = TRAINABLE if t.requires_grad else f"{part} weights ({DTYPE_NAMES.get(t.dtype, t.dtype)})"
            live.track(t, category)


@torch.no_grad()
def trace_caching(live: LiveBytes, run: Run, target: TargetDevice, card: float | None = None) -> Snapshot:
    """Caching, as `finetune.data.build_dataset` does it: every part but the denoiser on the device (it is placed
    after), the text encoders encode a caption and leave, then the VAE encodes images. On a card of `card` bytes,
    text encoders that do not fit in what is free encode on the CPU, as the loop decides
    (`finetune.text_pass.text_device`)."""
    live.reset_peak()
    offloaded = {n: run.family.parts[n] for n in run.offloaded}
    encoders = {n: m for n, m in offloaded.items() if n in run.family.text_encoder_names}
    others = {n: m for n, m in offloaded.items() if n not in encoders}
    count_weights(live, others, run.family.denoiser_name)
    text_bytes = sum(t.numel() * t.element_size() for m in encoders.values() for t in m.parameters())
    if card is None or fits_beside(text_bytes, card - live.total):
        count_weights(live, encoders, run.family.denoiser_name)
        if run.text_cached:
            with live.tagged(ACTIVATIONS, "caching"):
                run.family.encode_text(run.family.tokenize([""]))
        for module in encoders.values():  # cached text: its encoders leave before the VAE encodes
            live.untrack(*module.parameters(), *module.buffers())
    with live.tagged(ACTIVATIONS, "caching"):
        vae = run.family.vae
        res = run.cfg.data.resolution
        pixels = torch.zeros(2, 3, res, res, device="meta", dtype=next(vae.parameters()).dtype)
        # one image at a time through the family's posterior, as the cache encodes them: two show the pattern
        posterior = torch.cat([run.family.posterior(image) for image in pixels.split(1)])
        del pixels, posterior
    snapshot = live.peak
    for module in others.values():  # the loop moves them off the device after caching
        live.untrack(*module.parameters(), *module.buffers())
    return snapshot


@torch.no_grad()
def trace_validation(live: LiveBytes, run: Run, target: TargetDevice) -> Snapshot:
    """Validation images: the parts kept off the device come back, the prompts are encoded, the denoiser is called
    on the images' latents (twice the batch under classifier-free guidance) and the VAE decodes them."""
    family, cfg = run.family, run.cfg
    live.reset_peak()
    offloaded = {n: family.parts[n] for n in run.offloaded}
    count_weights(live, offloaded, run.family.denoiser_name)
    n = cfg.validation.num_validation_images
    with live.tagged(ACTIVATIONS, "validation images"), target.autocast(run.weight_dtype):
        cond = family.encode_text(family.tokenize([""] * n))
        g = family.guidance_batch
        c, h, w = latent_shape(family, cfg.data.resolution)
        noisy = torch.zeros(g * n, c, h, w, device="meta", dtype=run.weight_dtype)
        cond = {k: torch.cat([v] * g) for k, v in cond.items()}
        extra = {"time_ids": torch.zeros(g * n, 6, device="meta")}
        timesteps = torch.zeros(g * n, device="meta")
        family.predict(family.denoiser, noisy, timesteps, cond, extra)
        del noisy, cond
        latents = torch.zeros(n, c, h, w, device="meta", dtype=family.vae.dtype)
        family.vae.decode(latents)
    snapshot = live.peak
    for module in offloaded.values():  # back off the device after validation
        live.untrack(*module.parameters(), *module.buffers())
    return snapshot
