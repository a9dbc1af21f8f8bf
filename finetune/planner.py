"""The memory planner: a run's peak accelerator memory, predicted before the run, without a GPU, weights or data.

`--plan` on the training commands takes the run's own config and flags, builds its models on the meta device
from the pipeline's config files, and traces the real training step on meta tensors (`finetune.plan_trace`: the
product's `batch_loss`, backward and optimizer step, with the run's precision, adapter, quantisation and
checkpointing). It prints what is alive at the peak (weights by part and precision, trainable weights, gradients,
optimizer state, activations), the activations kept for backward with and without gradient checkpointing, the
caching and validation-image phases, and the margins the trace cannot see; the last line is `predicted peak:
N.NN GiB`. Without a GPU the run's device is taken to be a CUDA card of unlimited size.

`--fit GB` searches the cheapest settings that fit a card of that size: the options of `FIT_OPTIONS`, in order of
what they cost in speed, each from its mildest value to its strongest, then every earlier one relaxed back as far
as the card allows. It prints the flags to add and the plan with them.
"""

from __future__ import annotations

import contextvars
import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from difftune.core.config import PASSIVE, leaf_fields, option, to_dict, with_settings
from difftune.core.errors import UserError

GIB = 2**30
# What a trace on meta tensors cannot see, on a CUDA card (named, printed, added to the traced peak). The CUDA
# context is the driver's and the kernels' (about 0.3-0.6 GiB on recent cards with lazy module loading); cuBLAS and
# cuDNN allocate their workspaces through the caching allocator; the allocator rounds and splits blocks, and what
# it holds in reserve beyond the live tensors grows with the peak. Not measured here (no GPU).
MARGINS: tuple[tuple[str, float, float], ...] = (  # (name, GiB, fraction of the traced peak)
    ("CUDA context", 0.5, 0.0),
    ("cuBLAS/cuDNN workspaces", 0.25, 0.0),
    ("allocator rounding and fragmentation", 0.0, 0.05),
)


_PLANNING = contextvars.ContextVar("difftune_planning", default=False)


@contextmanager
def planning() -> Iterator[None]:
    """Settings are checked for the CUDA machine a memory plan is for, not this one: no GPU, bitsandbytes,
    prodigyopt or training data is needed here for the choices that would need them there."""
    token = _PLANNING.set(True)
    try:
        yield
    finally:
        _PLANNING.reset(token)


def checks_this_machine() -> bool:
    """Whether settings are checked against this machine (False while planning for another)."""
    return not _PLANNING.get()


@dataclass
class PlanConfig:
    """The memory planner: predict the run's peak accelerator memory instead of training (`finetune.planner`)."""

    plan: bool = option(
        "Print the predicted peak accelerator memory of one training step, broken down, and exit: no weights, data "
        "or GPU are needed, nothing trains.", default=False, resume=PASSIVE, card=False,
    )  # fmt: skip
    fit: float | None = option(
        "Find the cheapest settings (batch, gradient checkpointing, 8-bit optimizer, block swap, fp8 or NF4 base) for "
        "a card of this many GB (as sold: 24 means 24 GiB) and print them with their plan; implies --plan.",
        default=None, resume=PASSIVE, card=False,
    )  # fmt: skip

    @property
    def requested(self) -> bool:
        return self.plan or self.fit is not None

    def validate(self) -> None:
        if self.fit is not None and self.fit <= 0:
            raise UserError(f"--fit {self.fit}: give the card's memory in GB, e.g. --fit 24")


# ----------------------------------------------------------------------------------------------- what --fit tries


def fewer_per_step(cfg) -> list[dict]:
    """Halvings of the batch, the accumulation steps raised to keep the effective batch."""
    batch, accumulation = cfg.training.train_batch_size, cfg.training.gradient_accumulation_steps
    sizes = [batch >> k for k in range(1, batch.bit_length()) if batch >> k >= 1]
    return [{"train_batch_size": b, "gradient_accumulation_steps": math.ceil(batch * accumulation / b)} for b in sizes]


def swappable(cfg) -> range:
    """1 to all of the denoiser's repeated blocks (counted on its config, on the meta device)."""
    from difftune.finetune.block_swap import repeated_blocks
    from difftune.finetune.memory import meta_denoiser
    from difftune.pipelines.families import detect, read_model_index

    model = cfg.model.pretrained_model_name_or_path
    index = read_model_index(model)
    return range(1, len(repeated_blocks(meta_denoiser(model, index, detect(model, index).denoiser_name))) + 1)


# (flag, values): the settings --fit may add, in order of what they cost in speed (cheapest first), each value
# saving more memory than the one before it; a callable gives the values for the config. An option the config does
# not have is skipped, as is a value its validation refuses (e.g. a quantised base for full fine-tuning).
FIT_OPTIONS: tuple[tuple[str, tuple | Callable], ...] = (
    ("train_batch_size", fewer_per_step),
    ("gradient_checkpointing", (True,)),
    ("optimizer", ("adamw8bit",)),
    ("blocks_to_swap", swappable),
    ("fp8_base", (True,)),
    ("quantize_base", ("nf4",)),
)


def _settings(flag: str, value) -> dict:
    return value if isinstance(value, dict) else {flag: value}


def _values(cfg, flag: str, values) -> list[dict]:
    if flag not in leaf_fields(type(cfg)):
        return []
    candidates = [_settings(flag, v) for v in (values(cfg) if callable(values) else values)]
    current = to_dict(cfg)
    return [c for c in candidates if any(current[k] != v for k, v in c.items())]


# ----------------------------------------------------------------------------------------------- planning


@dataclass
class Plan:
    cfg: object
    trace: object  # plan_trace.Trace
    margins: list[tuple[str, float]]  # (name, bytes)

    @property
    def traced(self) -> int:
        return self.trace.peak.total

    @property
    def predicted(self) -> float:
        return self.traced + sum(nbytes for _, nbytes in self.margins)


def planned_config(cfg, settings: dict):
    """`cfg` with `settings` (flat flag names) changed, validated for the planned machine."""
    changed = with_settings(cfg, **settings)
    with planning():
        changed.validate()
    return changed


def predict(cfg, task, device_type: str = "cuda", detail: bool = True, card_gib: float | None = None) -> Plan:
    """`cfg`'s plan: its traced phases and the margins for `device_type` ("cuda"; "cpu": none), on a card of
    `card_gib` GiB (None: unlimited; a card decides where the text encoders build the cache). Plans are kept for
    the process's life: a search asks for the same settings more than once."""
    from difftune.finetune.plan_trace import trace_run

    key = (json.dumps(to_dict(cfg), sort_keys=True), task.name, device_type, detail, card_gib, MARGINS)
    if key not in _PLANS:
        fixed = sum(gib for _, gib, _ in MARGINS) * GIB if device_type == "cuda" else 0  # what the card holds first
        card = None if card_gib is None else card_gib * GIB - fixed
        trace = trace_run(cfg, task, device_type, detail, card)
        margins = []
        if device_type == "cuda":
            margins = [(name, gib * GIB + fraction * trace.peak.total) for name, gib, fraction in MARGINS]
        _PLANS[key] = Plan(cfg, trace, margins)
    return _PLANS[key]


_PLANS: dict[tuple, Plan] = {}


def fit(cfg, task, card_gib: float) -> tuple[dict, Plan]:
    """The cheapest settings (flag -> value) under which `cfg`'s predicted peak fits `card_gib`, and that plan.

    Each option of `FIT_OPTIONS` in turn: if even its strongest value does not fit, it is taken and the search goes
    on to the next; otherwise its mildest value that fits is found by bisection (memory falls monotonically along
    the values), and the options taken before it are relaxed back as far as the card allows."""
    budget = card_gib * GIB
    plan = predict(cfg, task, detail=False, card_gib=card_gib)
    if plan.predicted <= budget:
        return {}, plan
    chosen: dict = {}
    for flag, values in FIT_OPTIONS:
        options = _values(planned_config(cfg, chosen), flag, values)
        found, trials = _mildest(cfg, task, chosen, options, budget)
        if found is not None:
            chosen.update(options[found])
            return _relax(cfg, task, chosen, budget, trials[found], flag)
        strongest = trials.get(len(options) - 1)
        if strongest is not None:  # refused combinations leave the option out
            chosen.update(options[-1])
            plan = strongest
    raise UserError(
        f"--fit {card_gib:g}: nothing fits a {card_gib:g} GB card; the smallest reachable peak is "
        f"{plan.predicted / GIB:.2f} GiB, during {DURING[plan.trace.peak.phase]} (with {flags(chosen) or 'the settings given'})"
    )


def _mildest(cfg, task, chosen: dict, candidates: list[dict], budget: float) -> tuple[int | None, dict[int, Plan]]:
    """The first of `candidates` (ordered by memory saved) that fits on top of `chosen`, found by bisection (None
    if the last does not fit), and the plans traced on the way by index (refused combinations: none)."""
    trials: dict[int, Plan] = {}

    def fits(i: int) -> bool:
        if i not in trials:
            try:
                trials[i] = predict(
                    planned_config(cfg, {**chosen, **candidates[i]}), task, detail=False, card_gib=budget / GIB
                )
            except UserError:  # a combination the config refuses
                return False
        return trials[i].predicted <= budget

    if not candidates or not fits(len(candidates) - 1):
        return None, trials
    lo, hi = 0, len(candidates) - 1
    while lo < hi:
        mid = (lo + hi) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid + 1
    return lo, trials


def _relax(cfg, task, chosen: dict, budget: float, plan: Plan, last: str) -> tuple[dict, Plan]:
    """Undoes what is not needed: each option taken before `last` goes back towards the config's own value as far
    as the card allows (the batch grows again, gradient checkpointing goes off, ...)."""
    original = to_dict(cfg)
    for flag, values in FIT_OPTIONS:
        if flag == last:
            break
        taken = {k: v for k, v in chosen.items() if k == flag or (flag == "train_batch_size" and k in BATCH_KEYS)}
        if not taken:
            continue
        options = _values(cfg, flag, values)
        if taken not in options:
            continue
        milder = [{k: original[k] for k in taken}, *options[: options.index(taken)]]
        found, trials = _mildest(cfg, task, chosen, milder, budget)
        if found is not None:
            chosen = {k: v for k, v in {**chosen, **milder[found]}.items() if original[k] != v}
            plan = trials[found]
    return chosen, plan


BATCH_KEYS = ("train_batch_size", "gradient_accumulation_steps")


def flags(settings: dict) -> str:
    """Settings as the command-line flags that set them."""
    out = []
    for name, value in settings.items():
        if value is True:
            out.append(f"--{name}")
        elif value is False:
            out.append(f"--no-{name}")
        else:
            out.append(f"--{name} {value}")
    return " ".join(out)


# ----------------------------------------------------------------------------------------------- output


def run_plan(cfg, task) -> Plan:
    """`--plan` / `--fit`: validates `cfg` for the planned machine, prints the plan (and the flags --fit chose).
    The trainer's own INFO lines (caching, loading) are held back while it plans, and come back after."""
    logger = logging.getLogger("difftune")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with planning():
            cfg.validate()
        if cfg.plan.fit is not None:
            settings, plan = fit(cfg, task, cfg.plan.fit)
            print(f"--fit {cfg.plan.fit:g}: " + (f"add {flags(settings)}" if settings else "the settings given fit"))
            plan = predict(plan.cfg, task, card_gib=cfg.plan.fit)  # with the detail the search left out
        else:
            plan = predict(cfg, task)
    finally:
        logger.setLevel(level)
    print(report(plan))
    return plan


def report(plan: Plan) -> str:
    """The plan as the lines `--plan` prints, the last one `predicted peak: N.NN GiB`."""
    cfg, trace = plan.cfg, plan.trace
    run = trace.run
    lines = [describe(cfg, run), device_line(), ""]
    step = trace.phases["training step"]
    lines.append(f"training step: {size(step.total)} at its peak, during {DURING[step.phase]}")
    from difftune.finetune.plan_trace import ALWAYS_SHOWN

    categories = {**dict.fromkeys(ALWAYS_SHOWN, 0), **step.by_category}
    lines += [f"  {name:<48}{size(nbytes):>12}" for name, nbytes in sorted(categories.items(), key=lambda kv: -kv[1])
              if nbytes > 0 or name in ALWAYS_SHOWN]  # fmt: skip
    on, off = ("with", "without") if cfg.memory.gradient_checkpointing else ("without", "with")
    kept = f"activations kept for backward: {size(trace.kept_for_backward)} {on} gradient checkpointing"
    if trace.kept_other is not None:
        kept += f" ({size(trace.kept_other)} {off})"
    lines.append(kept)
    for name in ("caching", "validation images"):
        snapshot = trace.phases.get(name)
        if snapshot is not None:
            lines.append(f"{PHASE_NOTES[name]}: {size(snapshot.total)}")
    if "validation images" not in trace.phases:
        lines.append("validation images: none (no --validation_prompt)")
    if plan.margins:
        lines.append(f"traced peak: {size(plan.traced)}, during {DURING[trace.peak.phase]}; margins the trace "
                     "cannot see:")  # fmt: skip
        lines += [f"  {name:<48}{size(nbytes):>12}" for name, nbytes in plan.margins]
    lines.append(f"predicted peak: {plan.predicted / GIB:.2f} GiB")
    return "\n".join(lines)


DURING = {"caching": "caching", "forward": "the forward pass", "backward": "the backward pass",
          "optimizer step": "the optimizer step", "validation images": "validation images"}  # fmt: skip


def size(nbytes: float) -> str:
    """Bytes in GiB, or MiB or KiB when smaller than a tenth of the unit above."""
    if nbytes == 0:
        return "0"
    for unit, scale in (("GiB", GIB), ("MiB", 2**20)):
        if nbytes >= scale / 10:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes / 1024:.1f} KiB"


PHASE_NOTES = {
    "caching": "caching latents and text before training (the text encoders, then the VAE, encoding; the denoiser not yet placed)",
    "validation images": "validation images (every part on the device, guided denoiser batch, VAE decode)",
}


def describe(cfg, run) -> str:
    """One line: what is planned."""
    from difftune.finetune.optim import optimizer_name

    family = run.family
    trained = "full fine-tuning" if not hasattr(cfg, "network") else f"{cfg.network.adapter} rank {cfg.network.rank}"
    precision = cfg.training.mixed_precision or "no"
    parts = [
        f"plan: {trained} of a {family.name} model ({family.pipeline_class_name}) at {cfg.data.resolution} px",
        f"batch {cfg.training.train_batch_size} x {cfg.training.gradient_accumulation_steps} accumulation",
        f"mixed precision {precision}", f"optimizer {optimizer_name(cfg.optim)}",
        "gradient checkpointing" if cfg.memory.gradient_checkpointing else "no gradient checkpointing",
    ]  # fmt: skip
    if cfg.memory.quantize_base:
        parts.append(f"{cfg.memory.quantize_base} base")
    cached = "latents and text cached" if run.text_cached else "latents cached" if run.latents_cached else "no cache"
    parts.append(cached + (" (assuming the images allow it)" if run.latents_cached else ""))
    return ", ".join(parts)


def device_line() -> str:
    import torch

    if not torch.cuda.is_available():
        return "device: a CUDA card (no GPU here; size unlimited unless --fit names one)"
    props = torch.cuda.get_device_properties(0)
    return f"device: {props.name}, {props.total_memory / GIB:.1f} GiB"
