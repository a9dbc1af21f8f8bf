"""The memory planner: `--plan` prints the predicted peak without training, `--fit` finds the cheapest settings, the
trace matches torch's own CPU allocator, bad input is one line. Models are built on the meta device from configs."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from difftune.core.config import compose
from difftune.core.errors import UserError, run_main
from difftune.finetune import planner
from difftune.finetune.config import FullTrainConfig, LoraTrainConfig
from difftune.finetune.finetune_full import main as full_main
from difftune.finetune.finetune_lora import main as lora_main
from difftune.finetune.memtrace import FP32, LOW_PRECISION, LiveBytes, TargetDevice
from difftune.finetune.plan_trace import build_run, init_optimizer_state, train_step
from difftune.finetune.tasks import FULL, LORA

PEAK_LINE = re.compile(r"^predicted peak: \d+\.\d\d GiB$")


def lora_cfg(model, **settings) -> LoraTrainConfig:
    return planner.planned_config(compose(LoraTrainConfig, dict(pretrained_model_name_or_path=str(model))), settings)


def test_plan_prints_the_breakdown_and_trains_nothing(tiny_sd1, tmp_path, capsys):
    out = tmp_path / "run"
    lora_main(["--pretrained_model_name_or_path", str(tiny_sd1), "--plan", "--resolution", "64",
               "--train_batch_size", "4", "--output_dir", str(out), "--validation_prompt", "a red circle"])  # fmt: skip
    lines = capsys.readouterr().out.strip().splitlines()
    text = "\n".join(lines)
    assert PEAK_LINE.match(lines[-1]), lines[-1]
    for part in ("training step:", "denoiser weights (fp32)", "trainable weights", "optimizer state",
                 "activations kept for backward:", "caching latents", "validation images", "CUDA context"):  # fmt: skip
        assert part in text, part
    assert not out.exists()  # no data was read (none was given) and nothing was written


def test_plan_exits_0_as_a_command(tiny_sd1):
    run_main(full_main, ["--pretrained_model_name_or_path", str(tiny_sd1), "--plan", "--resolution", "64"])  # no exit


def test_the_python_api_plans_too(tiny_sd1, capsys):
    import difftune

    assert difftune.train_lora(pretrained_model_name_or_path=str(tiny_sd1), resolution=64, plan=True) is None
    assert PEAK_LINE.match(capsys.readouterr().out.strip().splitlines()[-1])


def test_cuda_only_choices_are_planned_here_with_their_memory(tiny_sd1):
    """An 8-bit optimizer and an NF4 base need CUDA and bitsandbytes to train, not to plan."""
    plain = planner.predict(lora_cfg(tiny_sd1, resolution=64, mixed_precision="fp16"), LORA, detail=False)
    packed = planner.predict(
        lora_cfg(tiny_sd1, resolution=64, mixed_precision="fp16", quantize_base="nf4", optimizer="adamw8bit"), LORA,
        detail=False,
    )  # fmt: skip
    weights = {name: n for name, n in packed.trace.phases["training step"].by_category.items() if "denoiser" in name}
    assert "denoiser weights (uint8)" in weights  # the packed linear layers
    assert packed.trace.phases["training step"].total < plain.trace.phases["training step"].total


def test_on_a_card_too_small_for_the_text_encoders_they_build_the_cache_on_the_cpu(tiny_sd1):
    """As the loop does (`finetune.text_pass.text_device`): the plan for a card leaves them out of the caching phase
    (at 16 px, where the text encoder's weights, not the VAE's activations, make the caching peak)."""
    cfg = lora_cfg(tiny_sd1, resolution=16)
    unlimited = planner.predict(cfg, LORA, detail=False).trace.phases["caching"]
    fixed = sum(gib for _, gib, _ in planner.MARGINS)
    tiny_card = planner.predict(cfg, LORA, detail=False, card_gib=fixed + 1e-6).trace.phases["caching"]
    assert any(name.startswith("text_encoder") and n for name, n in unlimited.by_category.items())
    assert not any(name.startswith("text_encoder") and n for name, n in tiny_card.by_category.items())
    assert tiny_card.total < unlimited.total
    big_card = planner.predict(cfg, LORA, detail=False, card_gib=80).trace.phases["caching"]
    assert big_card.total == unlimited.total


def test_gradient_checkpointing_keeps_fewer_activations(tiny_sd1):
    plan = planner.predict(lora_cfg(tiny_sd1, resolution=64, train_batch_size=4), LORA)
    assert plan.trace.kept_other < plan.trace.kept_for_backward  # the other setting: with checkpointing


@pytest.mark.parametrize(("task", "precision"), [(LORA, "bf16"), (FULL, "no")], ids=["lora-bf16", "full-fp32"])
def test_the_trace_matches_torchs_cpu_allocator(tiny_sd1, task, precision):
    """The planned step for a CPU device against the same step run for real: the peak of the bytes torch's CPU
    allocator holds, as it reports them to the profiler."""
    cls = LoraTrainConfig if task is LORA else FullTrainConfig
    settings = dict(pretrained_model_name_or_path=str(tiny_sd1), resolution=64, train_batch_size=4,
                    mixed_precision=precision, gradient_checkpointing=task is LORA)  # fmt: skip
    cfg = planner.planned_config(compose(cls, settings), {})
    trace = planner.predict(cfg, task, "cpu", detail=False).trace
    predicted = trace.phases["training step"].total - trace.before_step
    torch.manual_seed(0)
    run = build_run(cfg, task, "cpu", lambda dtype: torch.autocast("cpu", dtype=dtype), device_type="cpu")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        init_optimizer_state(run)
        train_step(run)
    from difftune.scripts.benchmark_planner import allocator_peak

    measured = allocator_peak(prof)  # a few hundred KiB of CPU-side bookkeeping (RNG states, noise) aside
    assert abs(predicted - measured) <= 0.02 * measured + 2**20, (predicted, measured)


def test_fit_takes_the_cheapest_settings_that_fit(tiny_sd1, monkeypatch):
    monkeypatch.setattr(planner, "MARGINS", ())  # the tiny model is far below any CUDA margin
    cfg = lora_cfg(tiny_sd1, resolution=64, train_batch_size=8)
    big = planner.predict(cfg, LORA, detail=False).predicted
    small = planner.predict(planner.planned_config(cfg, {"train_batch_size": 1, "gradient_checkpointing": True}),
                            LORA, detail=False).predicted  # fmt: skip
    card = (big + small) / 2 / planner.GIB
    settings, plan = planner.fit(cfg, LORA, card)
    assert settings and set(settings) <= {"train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing"}
    assert plan.predicted <= card * planner.GIB
    assert settings.get("train_batch_size", 8) * settings.get("gradient_accumulation_steps", 1) == 8  # same samples
    assert planner.fit(cfg, LORA, big / planner.GIB * 1.01)[0] == {}  # it fits as it is


def modelled(cfg, task, device_type="cuda", detail=True, card_gib=None):
    """A stand-in for `planner.predict` whose memory (GiB) follows the settings the way a step's does."""
    m, t = cfg.memory, cfg.training
    gib = 4.0 - 0.2 * m.blocks_to_swap - (1.0 if m.fp8_base else 0) - (2.0 if m.quantize_base else 0)
    gib += t.train_batch_size * (0.5 if m.gradient_checkpointing else 2.0) + (
        0.1 if cfg.optim.optimizer == "adamw" else 0
    )
    trace = SimpleNamespace(peak=SimpleNamespace(total=gib * planner.GIB, phase="backward"))
    return planner.Plan(cfg, trace, [])


@pytest.fixture
def modelled_fit(monkeypatch):
    monkeypatch.setattr(planner, "predict", modelled)
    monkeypatch.setattr(planner, "FIT_OPTIONS", (*planner.FIT_OPTIONS[:3], ("blocks_to_swap", range(1, 11)),
                                                 *planner.FIT_OPTIONS[4:]))  # fmt: skip


BATCH_1 = {"train_batch_size": 1, "gradient_accumulation_steps": 8, "gradient_checkpointing": True}


@pytest.mark.parametrize(
    ("card", "added"),
    [
        (9.0, {"train_batch_size": 2, "gradient_accumulation_steps": 4}),  # a smaller batch is enough
        (6.0, {"train_batch_size": 2, "gradient_accumulation_steps": 4, "gradient_checkpointing": True}),
        (4.5, {**BATCH_1, "optimizer": "adamw8bit"}),
        (3.0, {**BATCH_1, "blocks_to_swap": 8}),  # the 8-bit optimizer, taken on the way, is not needed then
    ],
)
def test_fit_takes_each_option_in_turn_and_relaxes_the_earlier_ones(card, added, modelled_fit):
    """Options in order of speed cost, each at its mildest value that fits, the earlier ones then relaxed: at 6 GB
    checkpointing lets the batch go back up to 2; swapping blocks comes before the fp8 and NF4 bases."""
    cfg = lora_cfg("m", train_batch_size=8)
    settings, plan = planner.fit(cfg, LORA, card)
    assert settings == added and plan.predicted <= card * planner.GIB


def test_fit_that_nothing_reaches_names_the_smallest_peak(modelled_fit):
    with pytest.raises(UserError, match=r"^--fit 0.5: nothing fits a 0.5 GB card; the smallest reachable peak is "
                                        r"\d+\.\d\d GiB, during the backward pass \(with --train_batch_size 1"):  # fmt: skip
        planner.fit(lora_cfg("m", train_batch_size=8), LORA, 0.5)


def test_a_model_folder_without_configs_is_one_line(tiny_sd1, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model_index.json").write_text((tiny_sd1 / "model_index.json").read_text())
    with pytest.raises(UserError, match=r"no scheduler/scheduler_config.json; the planner builds"):
        planner.predict(compose(LoraTrainConfig, dict(pretrained_model_name_or_path=str(folder))), LORA)


def test_an_unknown_family_is_one_line(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(UserError, match="KandinskyPipeline; supported"):
        planner.predict(compose(LoraTrainConfig, dict(pretrained_model_name_or_path=str(tmp_path))), LORA)


def test_a_bad_fit_is_one_line():
    with pytest.raises(UserError, match="--fit -1"):
        compose(LoraTrainConfig, dict(pretrained_model_name_or_path="m", fit=-1.0)).plan.validate()


# ----------------------------------------------------------------------------------------------- the trace itself


def test_live_bytes_follow_storages_not_views():
    live = LiveBytes()
    with live:
        a = torch.empty(1000, device="meta")
        b = a.view(10, 100)
        assert live.total == 4000
        del a
        assert live.total == 4000  # the view keeps the storage
        del b
        assert live.total == 0 and live.peak.total == 4000


def test_attention_never_keeps_the_attention_matrix():
    """The meta device would take the math path (an L x L matrix per head); the target's fused kernel keeps the
    output and its log-sum-exp."""
    q = torch.empty(1, 8, 4096, 64, device="meta", dtype=torch.bfloat16, requires_grad=True)
    live = LiveBytes()
    with live, TargetDevice("cuda"):
        before = live.total
        out = F.scaled_dot_product_attention(q, q, q)
        kept = live.total - before
    assert out.shape == q.shape and kept < 2 * q.numel() * q.element_size()


@pytest.mark.parametrize("device_type", ["cpu"])
def test_the_cpu_autocast_table_agrees_with_torchs_autocast(device_type):
    x = torch.randn(4, 8, 16)
    w = torch.randn(8, 16)
    cases = {
        "linear": lambda t: F.linear(t, w.to(t)), "layer_norm": lambda t: F.layer_norm(t, (16,)),
        "group_norm": lambda t: F.group_norm(t, 2), "softmax": lambda t: F.softmax(t, -1), "mse_loss":
        lambda t: F.mse_loss(t, t), "bmm": lambda t: torch.bmm(t, t.transpose(1, 2)), "silu": F.silu,
    }  # fmt: skip
    target = TargetDevice(device_type)
    for name, op in cases.items():
        with torch.autocast(device_type, dtype=torch.bfloat16):
            real = op(x.bfloat16()).dtype, op(x).dtype
        with target, target.autocast(torch.bfloat16):
            emulated = op(x.bfloat16().to("meta")).dtype, op(x.to("meta")).dtype
        assert emulated == real, name


def test_the_cuda_autocast_table_agrees_with_torchs_own_lists():
    source = (Path(torch.__file__).parent / "testing" / "_internal" / "autocast_test_lists.py").read_text()
    cuda = source[: source.index("class AutocastCPUTestLists")]  # read, not imported: it needs test-only packages
    listed = {name for name in re.findall(r'\("(\w+)"', cuda)}
    assert listed & set(LOW_PRECISION["cuda"]) >= {"linear", "conv2d", "bmm", "matmul", "baddbmm", "addmm"}
    assert {"layer_norm", "group_norm", "softmax", "mse_loss", "rms_norm"} <= listed & set(FP32["cuda"])
    assert not set(LOW_PRECISION["cuda"]) & set(FP32["cuda"])


# ----------------------------------------------------------------------------------------------- hardware presets

PRESET_PATHS = sorted(p for p in (Path(__file__).resolve().parents[2] / "configs" / "hardware").glob("*.yaml")
                      if p.stem != "cpu")  # fmt: skip


@pytest.mark.parametrize("path", PRESET_PATHS, ids=[p.stem for p in PRESET_PATHS])
def test_every_preset_states_a_prediction_under_its_card(path):
    from difftune.scripts.memory_table import preset_target, stated_peak

    stated = stated_peak(path)
    assert stated is not None, (
        f"{path.name} states no memory planner prediction (python -m difftune.scripts.memory_table)"
    )
    assert stated <= preset_target(path.stem)[2]


@pytest.mark.slow
@pytest.mark.parametrize("path", PRESET_PATHS, ids=[p.stem for p in PRESET_PATHS])
def test_every_preset_states_the_planners_prediction(path, tmp_path):
    """The planner on the preset's family's real shape (meta device) gives the figure the preset states."""
    from difftune.scripts.memory_table import preset_plan, stated_peak

    assert abs(preset_plan(path, tmp_path).predicted / planner.GIB - stated_peak(path)) <= 0.01
