"""Block swap (`--blocks_to_swap N`): N of the denoiser's repeated blocks live in CPU memory and come onto the
accelerator just before their forward, and again for their recomputation in the backward pass.

The blocks are the ones diffusers itself treats as repeated: every submodule whose class the model names in
`_repeated_blocks` (the units of its regional compilation: Flux's double- and single-stream blocks, a UNet's
`BasicTransformerBlock`s), else the children of its `transformer_blocks` / `single_transformer_blocks` lists
(SD 3). Only their frozen tensors move (parameters without gradient, buffers): an adapter's weights inside a block
stay on the accelerator with their gradients and optimizer state. The swapped blocks are spread evenly over the
execution order, so each copy overlaps the compute of the resident blocks between two swapped ones.

The schedule, per training step, for each swapped block:
- forward: onto the device at its forward pre-hook, back to CPU memory at its forward hook. The forward runs
  under non-reentrant gradient checkpointing, so autograd keeps nothing of it;
- backward: the recomputation brings it back, and it stays until its backward is done, because the recomputed
  forward hands the backward its frozen tensors themselves (torch's checkpoint detaches only tensors that require
  gradient): moved away earlier, the backward would read them from CPU memory. Its backward is done when the
  next swapped block's recomputation starts: the autograd engine runs a device's ready nodes highest sequence
  number first, so every node of a later block runs before the first node of an earlier one. Whatever is still on
  the device when the backward ends goes back then.
On CUDA each copy runs on a side stream from pinned memory, and the next block in execution order (the previous
one in the backward) is prefetched while the current one computes; a device tensor is freed only after the compute
stream is done with it (`record_stream`). Off CUDA the same schedule runs with moves that cost nothing (the "copy"
of a CPU tensor to the CPU is the tensor itself); on the meta device each onload is a new meta tensor, so a tracer
that counts live storages sees the swap's traffic.

Why not diffusers' group offloading (`diffusers.hooks.apply_group_offloading`, `ModelMixin.enable_group_offload`):
it is made for inference, and checked here it is wrong for training in three ways. It moves every tensor of a
block, the adapter's included, so the trained weights leave the device between steps while their gradients and
optimizer state stay on it (and with streams each offload restores the pinned copy taken when the hooks were
installed, which would undo every optimizer update of an adapter inside the block). Its offload runs in the
block's forward hook, which a recomputation never reaches (torch stops recomputing as soon as it has every saved
tensor), so every recomputed block stays on the device until the next forward: by the end of the backward pass all
of them are there at once. And it offloads every block of every module list, not N chosen ones.

Gradient checkpointing is required (`MemoryConfig.validate` says so): without it the forward saves the frozen
tensors for the backward, and they would be in CPU memory by then. This module installs the checkpoint function
(`BlockSwap.checkpoint`, non-reentrant as diffusers' default) and refuses a swapped block that runs with gradients
outside it.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from difftune.core.errors import UserError

logger = logging.getLogger(__name__)
LISTS = ("transformer_blocks", "single_transformer_blocks")  # where a transformer keeps its blocks


def repeated_blocks(denoiser: nn.Module) -> list[nn.Module]:
    """The denoiser's repeated blocks in module order: submodules of a class named in its `_repeated_blocks`, else
    the children of its `transformer_blocks` / `single_transformer_blocks` lists."""
    names = set(getattr(denoiser, "_repeated_blocks", None) or ())
    if names:
        return [m for m in denoiser.modules() if type(m).__name__ in names]
    return [block for name in LISTS for block in getattr(denoiser, name, None) or ()]


def spread(count: int, n: int) -> list[int]:
    """`n` of `count` indices spread evenly, each in the middle of its share (`spread(10, 2)` is [2, 7])."""
    return [int((i + 0.5) * count / n) for i in range(n)]


def check_count(denoiser: nn.Module, n: int) -> int:
    """The number of swappable blocks, or one UserError line when `n` exceeds it."""
    count = len(repeated_blocks(denoiser))
    if n > count:
        kind = type(denoiser).__name__
        raise UserError(f"--blocks_to_swap {n}: {kind} has {count} repeated blocks; swap at most {count}")
    return count


def in_backward() -> bool:
    """Whether the autograd engine is running a backward pass on this thread (a checkpoint's recomputation)."""
    return torch._C._current_graph_task_id() != -1


class BlockSwap:
    """Keeps `swapped` blocks' frozen tensors in CPU memory and moves them to `device` around their use."""

    def __init__(self, swapped: list[nn.Module], device: torch.device, timing: bool = False):
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.blocks = swapped
        self.index = {id(block): i for i, block in enumerate(swapped)}
        self.slots = [_frozen_slots(block) for block in swapped]
        self.host = [[self._to_host(get(slot)) for slot in slots] for slots in self.slots]
        self.resident: dict[int, list[torch.Tensor]] = {}  # block index -> its tensors on the device
        self.pending: tuple[int, list[torch.Tensor], object] | None = None  # a prefetch: index, tensors, event
        self.order: list[int] = []  # block indices in the order the forward runs them (learned on the first one)
        self.inside_checkpoint = 0
        self.callback_queued = False
        self.log: list[tuple[int, str, str]] | None = None  # (block, "on"|"off", "forward"|"backward") if recording
        self.timing = timing and self.cuda
        self.transfer_seconds = 0.0  # host-to-device copy time, measured when `timing` (benchmarks)
        self.copies: list[tuple[object, object]] = []
        for i in range(len(swapped)):
            self._rest(i)
        self.handles = []
        for block in swapped:
            self.handles.append(block.register_forward_pre_hook(self._pre_forward))
            self.handles.append(block.register_forward_hook(self._post_forward))

    # --- set-up -------------------------------------------------------------------------------------------

    @classmethod
    def attach(cls, denoiser: nn.Module, n: int, device: torch.device, timing: bool = False) -> BlockSwap:
        """Swaps `n` of `denoiser`'s repeated blocks, places everything else on `device`, and installs the
        checkpoint function that recomputes blocks (gradient checkpointing)."""
        check_count(denoiser, n)
        blocks = repeated_blocks(denoiser)
        swap = cls([blocks[i] for i in spread(len(blocks), n)], device, timing)
        _place_except(denoiser, swap.device, {(id(m), name) for slots in swap.slots for m, name, _ in slots})
        denoiser.enable_gradient_checkpointing(swap.checkpoint)
        logger.info("block swap: %d of %d %s blocks in CPU memory (%.2f GB)", n, len(blocks), type(denoiser).__name__,
                    swap.host_bytes / 1e9)  # fmt: skip
        return swap

    @property
    def host_bytes(self) -> int:
        """Bytes of the swapped tensors, kept in CPU memory between uses."""
        return sum(t.numel() * t.element_size() for host in self.host for t in host)

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        """The CPU copy a swapped tensor rests in: pinned for asynchronous copies on CUDA; the tensor itself where
        it already is in CPU memory (or on the meta device) and nothing copies it."""
        if not self.cuda:
            return tensor.detach() if self.device.type == "meta" else tensor.detach().to("cpu")
        return torch.empty_like(tensor, device="cpu", pin_memory=True).copy_(tensor.detach())

    # --- the checkpoint function ------------------------------------------------------------------------------

    def checkpoint(self, module: nn.Module, *args):
        """diffusers' `_gradient_checkpointing_func`: non-reentrant checkpointing of `module`, marked so that a
        swapped block can tell it is recomputable."""
        return torch.utils.checkpoint.checkpoint(self._run, module, *args, use_reentrant=False)

    def _run(self, module: nn.Module, *args):
        self.inside_checkpoint += 1
        try:
            return module(*args)
        finally:  # also when the recomputation stops early (torch raises once it has every saved tensor)
            self.inside_checkpoint -= 1

    # --- the hooks --------------------------------------------------------------------------------------------

    def _pre_forward(self, block: nn.Module, args) -> None:
        i = self.index[id(block)]
        if torch.is_grad_enabled() and not self.inside_checkpoint:
            raise UserError(
                f"--blocks_to_swap: {type(block).__name__} ran with gradients outside gradient checkpointing, so its "
                "frozen weights would be needed in the backward pass after leaving the device; drop --blocks_to_swap"
            )
        backward = in_backward()
        if backward:
            for other in [j for j in self.resident if j != i]:  # their backward is done (see the module docstring)
                self._rest(other)
            if not self.callback_queued:
                torch.autograd.Variable._execution_engine.queue_callback(self._end_of_backward)
                self.callback_queued = True
        elif i not in self.order:
            self.order.append(i)
        self._onload(i, "backward" if backward else "forward")
        following = self._following(i, backward)
        if following is not None and self.stream is not None:
            self._prefetch(following)

    def _post_forward(self, block: nn.Module, args, output) -> None:
        if not in_backward():  # a recomputed block stays until its backward is done
            self._rest(self.index[id(block)])

    def _end_of_backward(self) -> None:
        for i in list(self.resident):
            self._rest(i)
        self.callback_queued = False

    def _following(self, i: int, backward: bool) -> int | None:
        """The swapped block that runs after block `i`: the next in the forward, the previous in the backward."""
        if i not in self.order:
            return None
        position = self.order.index(i) + (-1 if backward else 1)
        return self.order[position] if 0 <= position < len(self.order) else None

    # --- moves ------------------------------------------------------------------------------------------------

    def _copy(self, i: int) -> tuple[list[torch.Tensor], object]:
        """Block `i`'s tensors on the device (on the side stream on CUDA) and the event that marks them ready."""
        if not self.cuda:
            make = torch.empty_like if self.device.type == "meta" else (lambda t: t.to(self.device))
            return [make(t) for t in self.host[i]], None
        with torch.cuda.stream(self.stream):
            start = torch.cuda.Event(enable_timing=True) if self.timing else None
            if start is not None:
                start.record(self.stream)
            tensors = [t.to(self.device, non_blocking=True) for t in self.host[i]]
            ready = torch.cuda.Event(enable_timing=self.timing)
            ready.record(self.stream)
        if start is not None:
            self.copies.append((start, ready))
        return tensors, ready

    def _prefetch(self, i: int) -> None:
        if i in self.resident or (self.pending is not None and self.pending[0] == i):
            return
        tensors, ready = self._copy(i)
        self.pending = (i, tensors, ready)  # a mispredicted earlier prefetch is dropped here

    def _onload(self, i: int, phase: str) -> None:
        if i in self.resident:
            return
        if self.pending is not None and self.pending[0] == i:
            _, tensors, ready = self.pending
            self.pending = None
        else:
            tensors, ready = self._copy(i)
        if ready is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(ready)
            for t in tensors:
                t.record_stream(compute)  # freed only once the compute stream is done with it
        for slot, t in zip(self.slots[i], tensors, strict=True):
            put(slot, t)
        self.resident[i] = tensors
        if self.log is not None:
            self.log.append((i, "on", phase))

    def _rest(self, i: int) -> None:
        for slot, host in zip(self.slots[i], self.host[i], strict=True):
            put(slot, self.at_rest(host))
        if self.resident.pop(i, None) is not None and self.log is not None:
            self.log.append((i, "off", "backward" if in_backward() else "forward"))

    def resting(self) -> list[torch.Tensor]:
        """The tensors (parameters and buffers, as the module holds them) of the blocks now in CPU memory."""
        return [get(slot) for i, slots in enumerate(self.slots) if i not in self.resident for slot in slots]

    def at_rest(self, host: torch.Tensor) -> torch.Tensor:
        """What a swapped tensor holds while its block is in CPU memory: the host copy itself."""
        return host

    def collect_transfer_time(self) -> float:
        """Adds the finished copies' time to `transfer_seconds` (CUDA with `timing`); returns the total."""
        if self.copies:
            torch.cuda.synchronize(self.device)
            self.transfer_seconds += sum(start.elapsed_time(end) for start, end in self.copies) / 1000
            self.copies = []
        return self.transfer_seconds

    def detach(self) -> None:
        """Removes the hooks; the swapped tensors stay where they are."""
        for handle in self.handles:
            handle.remove()


# ----------------------------------------------------------------------------------------------- tensors


Slot = tuple[nn.Module, str, bool]  # (module, attribute name, is a parameter)


def _frozen_slots(block: nn.Module) -> list[Slot]:
    """Where `block`'s frozen tensors live: parameters that take no gradient, and buffers."""
    slots = []
    for module in block.modules():
        slots += [(module, name, True) for name, p in module.named_parameters(recurse=False) if not p.requires_grad]
        slots += [(module, name, False) for name, b in module.named_buffers(recurse=False) if b is not None]
    return slots


def get(slot: Slot) -> torch.Tensor:
    module, name, is_param = slot
    return module._parameters[name] if is_param else module._buffers[name]


def put(slot: Slot, tensor: torch.Tensor) -> None:
    """Points the slot at `tensor`: a parameter keeps its identity (and its place in any optimizer)."""
    module, name, is_param = slot
    if is_param:
        module._parameters[name].data = tensor
    else:
        module._buffers[name] = tensor


def _place_except(module: nn.Module, device: torch.device, skip: set[tuple[int, str]]) -> None:
    """Moves every parameter and buffer of `module` to `device` except those in `skip` ((id(module), name))."""
    for sub in module.modules():
        for name, p in sub.named_parameters(recurse=False):
            if (id(sub), name) not in skip:
                p.data = p.data.to(device)
        for name, b in sub.named_buffers(recurse=False):
            if b is not None and (id(sub), name) not in skip:
                sub._buffers[name] = b.to(device)
