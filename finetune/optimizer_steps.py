"""How the optimizer steps when full fine-tuning saves memory: one parameter at a time as soon as its gradient is
ready (`--fused_backward_pass`), and into bf16 weights with stochastic rounding (`--full_bf16`).

- Gradient release (kohya's fused backward pass; torch's recipe "fusing the optimizer step into the backward
  pass"): a `register_post_accumulate_grad_hook` on each trained parameter steps the optimizer for that parameter
  alone and frees its gradient, so the model's gradients never exist all at once (a full fine-tune of SDXL's UNet
  holds 10 GB of fp32 gradients otherwise). The optimizer is the ordinary one (AdamW or Adafactor, whose updates are
  per parameter) with its ordinary groups, stepped for one parameter at a time, so its state, LR schedule and
  checkpoints are the standard step's, and so are the weights. It cannot accumulate gradients over micro-batches,
  clip by the global norm (that needs every gradient at once) or unscale fp16 gradients, and refuses them.
- Stochastic rounding for bf16 weights (Zamirai et al. 2020, "Revisiting BFloat16 Training"): rounded to nearest,
  an update smaller than half a bf16 step (2^-9 of the weight) is lost, and a small learning rate stops learning.
  Each parameter's step runs in fp32 (its weight and gradient upcast for the step, its optimizer state kept fp32)
  and the new weight is rounded into bf16 up or down at random, up with probability equal to its distance from the
  lower neighbour, so that the expected weight follows the fp32 trajectory. The weights and gradients take half the
  memory of fp32 ones; the optimizer state does not change.
Both step parameter by parameter, and neither branches on tensor values, so they run on meta tensors too.
"""

from __future__ import annotations

from types import MethodType

import torch

from difftune.core.errors import UserError

PER_PARAMETER = ("adamw", "adafactor")  # optimizers whose update of a parameter depends on that parameter alone


ROUNDING_STEP = "stochastic_rounding_step"  # a param-group entry: saved and restored with the optimizer's state


def step_parameter(optimizer: torch.optim.Optimizer, group: dict, p: torch.Tensor, rounding_seed: int | None) -> None:
    """Steps `optimizer` for parameter `p` of `group` alone; with a `rounding_seed`, in fp32 and rounded into `p`'s
    bf16 stochastically with noise drawn from that seed (the gradient is then freed)."""
    groups, weight = optimizer.param_groups, p.data
    if rounding_seed is not None:
        p.data = weight.float()
        p.grad = p.grad.float()
        state = optimizer.state.get(p, {})
        for key, value in state.items():
            if torch.is_tensor(value) and value.is_floating_point() and value.dtype != torch.float32:
                state[key] = value.float()
    optimizer.param_groups = [{**group, "params": [p]}]
    try:
        type(optimizer).step(optimizer)
    finally:
        optimizer.param_groups = groups
        if rounding_seed is not None:
            p.grad = None
            round_stochastic_(weight, p.data, rounding_seed)
            p.data = weight


def round_stochastic_(target: torch.Tensor, source: torch.Tensor, seed: int) -> None:
    """Copies fp32 `source` into bf16 `target`, rounding each value up or down at random, up with probability equal
    to the dropped low 16 bits' share of a bf16 step: a bf16 value is an fp32 value's high 16 bits, so adding a
    uniform 16-bit integer to the bit pattern carries into them with exactly that probability (for negative values
    it moves away from zero with that probability: the pattern is sign and magnitude). The noise comes from its own
    generator seeded with `seed`, so that a resumed run draws what the uninterrupted one drew."""
    bits = source.contiguous().view(torch.int32)
    if bits.device.type == "meta":
        noise = torch.empty_like(bits)
    else:
        generator = torch.Generator(bits.device).manual_seed(seed)
        noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    target.copy_((bits + noise).bitwise_and_(-65536).view(torch.float32))  # exact in bf16: low half zero


def rounding_seeds(optimizer: torch.optim.Optimizer, seed: int):
    """A function (group, parameter) -> the seed of that parameter's rounding noise at the group's current step:
    distinct per run seed, step and parameter, and the same again after a resume."""
    index = {id(p): i for i, p in enumerate(p for group in optimizer.param_groups for p in group["params"])}
    for group in optimizer.param_groups:
        group.setdefault(ROUNDING_STEP, 0)
    return lambda group, p: (seed * 1_000_003 + group[ROUNDING_STEP] * 65_537 + index[id(p)]) % 2**62


def stochastic_bf16_step(optimizer: torch.optim.Optimizer, seed: int = 0) -> None:
    """Makes `optimizer.step()` step each parameter with a gradient in fp32 and round it stochastically into bf16,
    and keeps its fp32 state fp32 when a checkpoint is loaded (torch casts loaded state to each parameter's dtype).
    Call it before an LR scheduler wraps `step`."""
    seed_of = rounding_seeds(optimizer, seed)

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    step_parameter(self, group, p, seed_of(group, p))
            group[ROUNDING_STEP] += 1

    optimizer.step = MethodType(step, optimizer)  # bound, as LR schedulers expect when they wrap it
    kept: dict[torch.Tensor, torch.Tensor] = {}

    def before_load(opt, state_dict):
        for group in opt.param_groups:
            for p in group["params"]:
                kept[p] = p.data
                p.data = torch.empty(0, dtype=torch.float32, device=p.device)  # what torch casts state to

    def after_load(opt):
        for p, data in kept.items():
            p.data = data
        kept.clear()

    optimizer.register_load_state_dict_pre_hook(before_load)
    optimizer.register_load_state_dict_post_hook(after_load)


def release_gradients(optimizer: torch.optim.Optimizer, seed: int | None = None) -> list:
    """Steps each parameter of `optimizer` as soon as its gradient is accumulated and frees the gradient; the usual
    `optimizer.step()` then finds no gradient and does nothing. With a `seed`, each step rounds stochastically into
    bf16 (`stochastic_bf16_step` must be applied too: it counts the steps). Returns the hooks' handles."""
    seed_of = rounding_seeds(optimizer, seed) if seed is not None else None
    handles = []
    for group in optimizer.param_groups:
        for p in group["params"]:

            def hook(p: torch.Tensor, group: dict = group) -> None:
                step_parameter(optimizer, group, p, seed_of(group, p) if seed_of is not None else None)
                p.grad = None

            handles.append(p.register_post_accumulate_grad_hook(hook))
    return handles


def apply_step_options(
    optimizer: torch.optim.Optimizer, fused_backward_pass: bool, full_bf16: bool, seed: int
) -> None:
    """`--fused_backward_pass` and `--full_bf16` on a freshly built optimizer (before its LR scheduler); `seed` (the
    run's) seeds the rounding noise."""
    if full_bf16:
        stochastic_bf16_step(optimizer, seed)
    if fused_backward_pass:
        release_gradients(optimizer, seed if full_bf16 else None)


def check_step_options(memory, optim, training, optimizer: str) -> None:
    """One line for a combination the two options cannot honour, before anything loads."""
    flags = [flag for flag, on in (("--fused_backward_pass", memory.fused_backward_pass),
                                   ("--full_bf16", memory.full_bf16)) if on]  # fmt: skip
    for flag in flags:
        if optimizer not in PER_PARAMETER:
            raise UserError(
                f"{flag} steps one parameter at a time: use --optimizer adamw or adafactor, not {optimizer}"
            )
    if memory.fused_backward_pass:
        if training.gradient_accumulation_steps > 1:
            raise UserError(
                "--fused_backward_pass steps each parameter during the backward pass, so gradients cannot accumulate: "
                f"drop --gradient_accumulation_steps {training.gradient_accumulation_steps}"
            )
        if optim.max_grad_norm > 0:
            raise UserError(
                "--fused_backward_pass steps each parameter before the global gradient norm exists: pass "
                "--max_grad_norm 0 (no clipping)"
            )
    check_precision(memory, training.mixed_precision)
    if memory.full_bf16 and training.use_ema:
        raise UserError("--use_ema with --full_bf16 would keep the EMA in bf16, where its small updates round away; "
                        "drop one of them")  # fmt: skip


def check_precision(memory, mixed_precision: str | None) -> None:
    """`--full_bf16` computes in bf16; `--fused_backward_pass` cannot step on fp16's scaled gradients. Checked with
    the flag's value before loading and again with accelerate's (its config may set the precision)."""
    if memory.full_bf16 and mixed_precision not in (None, "bf16"):
        raise UserError(f"--full_bf16 needs --mixed_precision bf16, not {mixed_precision}")
    if memory.fused_backward_pass and mixed_precision == "fp16":
        raise UserError(
            "--fused_backward_pass cannot step on fp16's loss-scaled gradients: use --mixed_precision bf16 or no"
        )
