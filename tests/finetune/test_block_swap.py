"""Block swap (`--blocks_to_swap N`) on CPU, where the moves cost nothing and the schedule is the GPU's: the same
loss and adapter gradients as without it, each block resident only around its forward and its recomputation (and
that recomputation's backward), training, accumulation, validation images and resume through the loop, and the
one-line refusals."""

from __future__ import annotations

import pytest
import torch

from difftune.core.config import compose, from_values
from difftune.core.errors import UserError
from difftune.finetune.block_swap import BlockSwap, in_backward, repeated_blocks, spread
from difftune.finetune.config import FullTrainConfig, LoraTrainConfig
from difftune.finetune.loop import train
from difftune.finetune.memory import MemoryConfig, apply_memory_options, meta_denoiser, resident_bytes
from difftune.finetune.tasks import LORA
from difftune.pipelines.families import read_model_index
from difftune.toyworld.tiny import save_tiny_pipeline
from difftune.toyworld.tiny_denoisers import flux, sd3, unet
from difftune.toyworld.tiny_families import FAMILIES as FAMILY_NAMES
from difftune.toyworld.tiny_families import TEST_MAX_SEQUENCE_LENGTH


class Poisoned(BlockSwap):
    """At rest a swapped tensor holds NaN: any use of a block while it is in "CPU memory" poisons the result, as a
    CPU tensor in a GPU kernel would fail."""

    def at_rest(self, host):
        return torch.full_like(host, float("nan"))


@pytest.mark.parametrize(
    "kind, adapter",
    [("flux", "lora"), ("sd3", "lora"), ("unet", "lora"), ("unet", "dora"), ("unet", "loha"), ("unet", "lokr")],
)
def test_same_loss_and_adapter_gradients_as_without_swap(kind, adapter, denoisers):
    reference = denoisers.adapted(kind, adapter)
    reference.enable_gradient_checkpointing()
    expected_loss, expected = denoisers.loss_and_grads(kind, reference)

    model = denoisers.adapted(kind, adapter)
    count = len(repeated_blocks(model))
    swap = Poisoned.attach(model, count - 1, torch.device("cpu"))
    for _ in range(2):  # the second step runs with the execution order learned in the first
        loss, grads = denoisers.loss_and_grads(kind, model)
        assert torch.equal(loss, expected_loss)
        assert grads.keys() == expected.keys()
        for name in grads:
            torch.testing.assert_close(grads[name], expected[name], rtol=0, atol=0, msg=name)
    trainable = [p for block in swap.blocks for p in block.parameters() if p.requires_grad]
    assert trainable and all(not p.isnan().any() for p in trainable)  # the adapter inside the blocks stayed put


@pytest.mark.parametrize("kind", ["flux", "unet"])
def test_each_block_is_resident_only_around_its_forward_and_its_recomputation(kind, denoisers):
    model = denoisers.adapted(kind)
    swap = Poisoned.attach(model, 2, torch.device("cpu"))
    swap.log = []
    uses = []  # (block, phase) of every leaf module call inside a swapped block, checked while it runs

    def check(block_index):
        def hook(module, args):
            assert block_index in swap.resident, f"block {block_index} used while in CPU memory"
            uses.append((block_index, "backward" if in_backward() else "forward"))

        return hook

    for i, block in enumerate(swap.blocks):
        for leaf in block.modules():
            if not list(leaf.children()):
                leaf.register_forward_pre_hook(check(i))
    denoisers.loss_and_grads(kind, model)
    for i in range(2):
        assert [(on, phase) for j, on, phase in swap.log if j == i] == [
            ("on", "forward"), ("off", "forward"), ("on", "backward"), ("off", "backward")
        ]  # fmt: skip
        assert {phase for j, phase in uses if j == i} == {"forward", "backward"}  # used in both, always resident
    resident, most = set(), 0
    for i, on, _ in swap.log:
        resident = resident | {i} if on == "on" else resident - {i}
        most = max(most, len(resident))
    assert most == 1 and not swap.resident  # one at a time without prefetch, none left after the step
    # forward order then reverse order in the backward: the order the prefetch follows on CUDA
    forward = [i for i, on, phase in swap.log if on == "on" and phase == "forward"]
    backward = [i for i, on, phase in swap.log if on == "on" and phase == "backward"]
    assert forward == swap.order and backward == swap.order[::-1]


def test_offloading_right_after_the_recomputation_would_hand_the_backward_moved_weights(denoisers):
    """Why a recomputed block stays until its backward is done: offloaded when its recomputed forward returns (as
    diffusers' group offloading would, were its hook reached), the backward reads the moved tensors."""

    class Early(Poisoned):
        def _run(self, module, *args):
            try:
                return super()._run(module, *args)
            finally:
                if in_backward() and id(module) in self.index:
                    self._rest(self.index[id(module)])

    model = denoisers.adapted("unet")
    Early.attach(model, 2, torch.device("cpu"))
    _, grads = denoisers.loss_and_grads("unet", model)
    assert any(g.isnan().any() for g in grads.values())


def test_diffusers_group_offloading_moves_the_adapter_and_keeps_recomputed_blocks(denoisers):
    """The two reasons `finetune.block_swap` does not use diffusers' group offloading for training."""
    from diffusers.hooks import apply_group_offloading
    from diffusers.hooks import group_offloading as hooks

    model = denoisers.adapted("flux")
    model.enable_gradient_checkpointing()
    apply_group_offloading(model, onload_device="cpu", offload_type="block_level", num_blocks_per_group=1)
    group = model.transformer_blocks[0]._diffusers_hook.get_hook("group_offloading").group
    assert any(p.requires_grad for module in group.modules for p in module.parameters())  # the adapter moves too
    events = []
    onload, offload = hooks.ModuleGroup.onload_, hooks.ModuleGroup.offload_
    try:
        hooks.ModuleGroup.onload_ = lambda self: (events.append(("on", in_backward())), onload(self))
        hooks.ModuleGroup.offload_ = lambda self: (events.append(("off", in_backward())), offload(self))
        denoisers.loss_and_grads("flux", model)
    finally:
        hooks.ModuleGroup.onload_, hooks.ModuleGroup.offload_ = onload, offload
    backward = [on for on, during in events if during]
    assert backward.count("on") == len(repeated_blocks(model)) and backward.count("off") == 0


def test_blocks_are_found_generically_and_spread():
    assert len(repeated_blocks(flux())) == 5  # 2 double + 3 single, from _repeated_blocks
    assert len(repeated_blocks(sd3())) == 3  # no _repeated_blocks: its transformer_blocks
    assert {type(b).__name__ for b in repeated_blocks(unet())} == {"BasicTransformerBlock"}
    assert spread(10, 2) == [2, 7] and spread(5, 5) == [0, 1, 2, 3, 4] and spread(57, 1) == [28]


def test_more_blocks_than_the_model_has_is_one_line_naming_the_count(denoisers):
    with pytest.raises(UserError, match=r"--blocks_to_swap 6: FluxTransformer2DModel has 5 repeated blocks"):
        BlockSwap.attach(denoisers.adapted("flux"), 6, torch.device("cpu"))


def test_the_count_is_checked_from_the_config_before_loading(tmp_path):
    model = save_tiny_pipeline(tmp_path / "flux", size="test", family="flux")
    index = read_model_index(str(model))
    denoiser = meta_denoiser(str(model), index, "transformer")
    assert all(p.device.type == "meta" for p in denoiser.parameters())
    cfg = compose(LoraTrainConfig, dict(pretrained_model_name_or_path=str(model), gradient_checkpointing=True,
                                        blocks_to_swap=4))  # fmt: skip
    with pytest.raises(UserError, match="has 3 repeated blocks; swap at most 3"):
        cfg.memory.check_model(str(model), index, "transformer")


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(blocks_to_swap=2), "needs --gradient_checkpointing"),
        (dict(blocks_to_swap=-1, gradient_checkpointing=True), "must not be negative"),
        (dict(blocks_to_swap=2, gradient_checkpointing=True, compile=True), "drop one of them"),
    ],
)
def test_misuse_is_one_line(settings, message):
    with pytest.raises(UserError, match=message):
        from_values(LoraTrainConfig, dict(pretrained_model_name_or_path="m", train_data_dir="d", **settings))


def test_full_fine_tuning_refuses_block_swap():
    with pytest.raises(UserError, match="--blocks_to_swap 2 is for a frozen base; .* use finetune_lora.py"):
        from_values(FullTrainConfig, dict(pretrained_model_name_or_path="m", train_data_dir="d", blocks_to_swap=2,
                                          gradient_checkpointing=True))  # fmt: skip


def test_more_than_one_process_is_refused():
    cfg = compose(LoraTrainConfig, dict(pretrained_model_name_or_path="m", blocks_to_swap=1))
    with pytest.raises(UserError, match="runs on one process"):
        cfg.memory.check_run(2, None)


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("swap") / "flux", size="test", family="flux")


def run(model, data, out, **settings):
    values = dict(pretrained_model_name_or_path=str(model), train_data_dir=str(data), output_dir=str(out),
                  resolution=32, center_crop=True, train_batch_size=2, gradient_accumulation_steps=2,
                  max_train_steps=3, checkpointing_steps=2, learning_rate=1e-3, report_to="none", seed=1,
                  max_sequence_length=16, gradient_checkpointing=True)  # fmt: skip
    return train(from_values(LoraTrainConfig, {**values, **settings}), LORA)


def test_training_with_swap_matches_training_without_and_resumes(tiny_flux, shapes_dir, tmp_path, monkeypatch):
    """DoRA (it reads its base weight outside the base layer's forward), accumulation 2, validation images."""
    attached = []
    attach = BlockSwap.attach.__func__

    def recording(cls, *args, **kwargs):
        attached.append(attach(cls, *args, **kwargs))
        return attached[-1]

    monkeypatch.setattr(BlockSwap, "attach", classmethod(recording))
    plain = run(tiny_flux, shapes_dir, tmp_path / "plain", adapter="dora")
    swapped = run(tiny_flux, shapes_dir, tmp_path / "swap", adapter="dora", blocks_to_swap=2,
                  validation_prompt=["a red circle"], validation_steps=3, num_validation_images=1,
                  validation_inference_steps=2)  # fmt: skip
    assert swapped.losses == pytest.approx(plain.losses, rel=1e-5)
    assert len(attached) == 1 and len(attached[0].order) == 2 and not attached[0].resident
    assert (tmp_path / "swap" / "validation" / "step-3" / "grid.png").is_file()
    run(tiny_flux, shapes_dir, tmp_path / "resumed", adapter="dora", blocks_to_swap=2, max_train_steps=2)
    resumed = run(tiny_flux, shapes_dir, tmp_path / "resumed", adapter="dora", blocks_to_swap=2,
                  resume_from_checkpoint="latest")  # fmt: skip
    assert resumed.losses == pytest.approx(plain.losses[2:], rel=1e-5)


def test_the_memory_options_run_on_the_meta_device_and_say_what_stays_resident(denoisers):
    """What the memory planner traces: fp8 and block swap applied to a meta-device model, one step, and the bytes
    that stay on the accelerator between uses."""
    from difftune.finetune.adapters import AdapterConfig, adapter_config, add_adapter
    from difftune.toyworld.tiny_denoisers import example_loss

    with torch.device("meta"):
        model = flux().requires_grad_(False)
    add_adapter(model, adapter_config(AdapterConfig(rank=2), denoisers.ATTENTION))
    everything = resident_bytes(model)
    memory = MemoryConfig(gradient_checkpointing=True, fp8_base=True, blocks_to_swap=3)
    apply_memory_options(model, memory, torch.device("meta"))
    fp8 = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert 0 < resident_bytes(model) < fp8 < everything
    example_loss("flux", model, device="meta").backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize(
    "family", [f if f == "qwen_image" else pytest.param(f, marks=pytest.mark.slow) for f in FAMILY_NAMES]
)
def test_the_2026_families_train_the_same_with_blocks_swapped(family, family_model, shapes_dir, tmp_path):
    """Block swap on an fp8 base (the small-card recipe) for each of the families added in 2026."""
    settings = dict(max_train_steps=2, gradient_accumulation_steps=1, fp8_base=True,
                    max_sequence_length=TEST_MAX_SEQUENCE_LENGTH)  # fmt: skip
    fp8 = run(family_model(family), shapes_dir, tmp_path / "fp8", **settings)
    swapped = run(family_model(family), shapes_dir, tmp_path / "swap", blocks_to_swap=2, **settings)
    assert swapped.losses == fp8.losses
