"""Hardware presets in configs/hardware/: strict TrainConfig keys, the promised settings per card, composition."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest
import torch

from difftune.core.config import load_yaml, parse
from difftune.core.errors import UserError
from difftune.finetune.config import LoraTrainConfig

REPO_ROOT = Path(__file__).resolve().parents[2]

HARDWARE = REPO_ROOT / "configs" / "hardware"
CARDS = ["gpu-8gb", "gpu-12gb", "gpu-16gb", "gpu-24gb", "a100-40gb", "a100-80gb"]  # smallest first
FLOW = [f"{card}-{family}" for family in ("sd3", "flux") for card in CARDS]
UNET = ["cpu", *CARDS, *(f"{card}-sdxl" for card in CARDS)]
FLUX_BLOCKS = 57  # Flux.1's 19 double- and 38 single-stream blocks (scripts/shaped_models.py's config)
# The 2026 families' presets: the cards each ships for (Flux.2-dev's 32B transformer is not shipped for 8 GB:
# docs/memory.md says why) and its repeated blocks (scripts/shaped_families.py's released configs).
FAMILIES_2026 = {"qwen": (CARDS, 60), "flux2": (CARDS[1:], 56), "klein": (CARDS, 25), "zimage": (CARDS, 30),
                 "chroma": (CARDS, 57)}  # fmt: skip
NEW = [f"{card}-{suffix}" for suffix, (cards, _) in FAMILIES_2026.items() for card in cards]
NAMES = [*UNET, *FLOW, *NEW]
CORE = {"train_batch_size", "gradient_accumulation_steps", "gradient_checkpointing", "mixed_precision", "optimizer",
        "quantize_base", "cache_latents"}  # fmt: skip


def preset(name: str) -> dict:
    return load_yaml(HARDWARE / f"{name}.yaml", LoraTrainConfig)


def parse_lora(argv: list[str]) -> LoraTrainConfig:
    """The LoRA script's config from `argv`, with a model named unless `argv` names one (the flag is required)."""
    model = [] if "--pretrained_model_name_or_path" in argv else ["--pretrained_model_name_or_path", "base"]
    return parse(LoraTrainConfig, [*model, *argv], prog="finetune_lora.py")


def test_exactly_the_documented_presets_exist():
    assert sorted(p.stem for p in HARDWARE.glob("*.yaml")) == sorted(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_loads_strictly_and_sets_the_core_options(name):
    values = preset(name)  # load_yaml rejects any key TrainConfig lacks and any wrong type
    assert CORE <= set(values), CORE - set(values)
    assert values["cache_latents"] is True


@pytest.mark.parametrize("name", FLOW)
def test_flow_presets_use_bf16_checkpointing_and_the_promised_base(name):
    """SD3/Flux overflow in fp16. Consumer cards take Flux in fp8 with fewer blocks swapped the bigger the card,
    and 8-bit AdamW; A100s take the bf16 base as it is."""
    values = preset(name)
    assert values["mixed_precision"] == "bf16" and values["gradient_checkpointing"] is True
    assert values["quantize_base"] is None
    consumer = not name.startswith("a100")
    assert (values["optimizer"] == "adamw8bit") == consumer
    fp8 = name.endswith("-flux") and consumer or name == "gpu-8gb-sd3"
    assert values.get("fp8_base", False) is fp8


def test_flux_swaps_fewer_blocks_on_bigger_cards():
    swapped = [preset(f"{card}-flux").get("blocks_to_swap", 0) for card in CARDS]
    assert swapped == sorted(swapped, reverse=True) and swapped[0] < FLUX_BLOCKS and swapped[-1] == 0
    assert preset("gpu-24gb-flux").get("blocks_to_swap", 0) == 0  # fp8 alone fits


@pytest.mark.parametrize("name", [n for n in NAMES if n != "cpu"])
def test_every_card_preset_says_its_techniques_and_expected_peak(name):
    comment = "".join(
        line for line in (HARDWARE / f"{name}.yaml").read_text().splitlines(True) if line.startswith("#")
    )
    assert re.search(r"Expected peak: \d+\.\d\d GiB, the memory planner's prediction", comment), name


@pytest.mark.parametrize("name", UNET)
def test_precision_optimizer_and_quantisation_by_card(name):
    values = preset(name)
    card = name.removesuffix("-sdxl")
    expected_precision = {"cpu": "no"}.get(card, "bf16" if card.startswith("a100") else "fp16")
    assert values["mixed_precision"] == expected_precision
    small = card in ("gpu-8gb", "gpu-12gb")
    assert (values["optimizer"] == "adamw8bit") == (small or name in ("gpu-16gb-sdxl", "gpu-24gb-sdxl"))
    assert values["quantize_base"] == ("nf4" if name == "gpu-8gb-sdxl" else None)
    if name.endswith("-sdxl") or small:
        assert values["gradient_checkpointing"] is True


@pytest.mark.parametrize("family", ["", "-sdxl", "-sd3", "-flux"])
def test_bigger_cards_never_get_smaller_batches(family):
    per_step = [preset(card + family)["train_batch_size"] for card in CARDS]
    effective = [preset(card + family)["train_batch_size"] * preset(card + family)["gradient_accumulation_steps"]
                 for card in CARDS]  # fmt: skip
    assert per_step == sorted(per_step) and effective == sorted(effective)
    assert per_step[-1] > per_step[0]  # the largest card batches more than the smallest


@pytest.mark.parametrize("card", CARDS)
def test_comments_say_which_file_is_for_sd15_and_which_for_sdxl(card):
    sd15 = (HARDWARE / f"{card}.yaml").read_text()
    sdxl = (HARDWARE / f"{card}-sdxl.yaml").read_text()
    assert sd15.startswith("#") and sdxl.startswith("#")
    assert f"{card}-sdxl.yaml" in sd15 and "SD 1" in sd15
    assert f"{card}.yaml" in sdxl and "SDXL" in sdxl


@pytest.mark.parametrize("name", NAMES)
def test_gpu_only_settings_stop_at_startup_on_a_cpu_machine(name, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    values = preset(name)
    argv = ["--config", str(HARDWARE / f"{name}.yaml"), "--train_data_dir", "data"]
    if values["optimizer"] == "adamw8bit" or values["quantize_base"] is not None:
        with pytest.raises(UserError, match="needs a CUDA GPU"):
            parse_lora(argv)
    else:
        assert parse_lora(argv).data.train_data_dir == "data"


@pytest.mark.parametrize("name", NAMES)
def test_every_preset_passes_startup_checks_with_cuda(name, with_cuda):
    cfg = parse_lora(["--config", str(HARDWARE / f"{name}.yaml"), "--train_data_dir", "data"])
    assert cfg.training.train_batch_size == preset(name)["train_batch_size"]


def test_preset_composes_with_a_user_config_and_flags(tmp_path, with_cuda):
    user = tmp_path / "my_run.yaml"
    user.write_text("train_batch_size: 3\nlearning_rate: 5.0e-4\nrank: 8\n")
    gpu = str(HARDWARE / "gpu-12gb.yaml")
    cfg = parse_lora(["--config", gpu, "--config", str(user), "--train_data_dir", "d", "--rank", "16"])
    # later file wins over the preset; the preset fills what the user file leaves out; flags win over both
    assert (cfg.training.train_batch_size, cfg.optim.learning_rate, cfg.network.rank) == (3, 5e-4, 16)
    assert (cfg.training.gradient_accumulation_steps, cfg.optim.optimizer, cfg.training.mixed_precision) == (
        2,
        "adamw8bit",
        "fp16",
    )
    assert cfg.memory.gradient_checkpointing is True
    # in the other order the preset wins
    cfg = parse_lora(["--config", str(user), "--config", gpu, "--train_data_dir", "d"])
    assert (cfg.training.train_batch_size, cfg.optim.learning_rate) == (2, 5e-4)


def test_cpu_preset_trains_the_tiny_model(tiny_sd1, shapes_dir, tmp_path):
    from difftune.finetune.loop import train
    from difftune.finetune.tasks import LORA

    user = tmp_path / "run.yaml"
    user.write_text(f"pretrained_model_name_or_path: {tiny_sd1}\ntrain_data_dir: {shapes_dir}\nresolution: 32\n"
                    f"max_train_steps: 2\nreport_to: none\noutput_dir: {tmp_path / 'out'}\n")  # fmt: skip
    cfg = parse(LoraTrainConfig, ["--config", str(HARDWARE / "cpu.yaml"), "--config", str(user)])
    result = train(cfg, LORA)
    assert result.global_step == 2 and all(math.isfinite(x) for x in result.losses)
    assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize("name", NEW)
def test_2026_presets_use_bf16_checkpointing_and_state_a_peak_under_their_card(name):
    """The 2026 families are transformers trained in bf16; each preset's stated prediction (the memory planner's, on
    the released shape) is under its card; consumer cards take 8-bit AdamW."""
    from difftune.scripts.memory_table import preset_target, stated_peak

    values = preset(name)
    assert values["mixed_precision"] == "bf16" and values["gradient_checkpointing"] is True
    assert values["quantize_base"] is None
    assert (values["optimizer"] == "adamw8bit") == (not name.startswith("a100"))
    stated = stated_peak(HARDWARE / f"{name}.yaml")
    assert stated is not None and stated <= preset_target(name)[2]


@pytest.mark.parametrize("suffix", FAMILIES_2026)
def test_2026_presets_lighten_the_base_as_cards_shrink(suffix):
    """Smaller cards never get more of the base on the device: the swapped blocks (never all) and fp8 only grow
    as the card shrinks, and the batch only falls."""
    cards, blocks = FAMILIES_2026[suffix]
    values = [preset(f"{card}-{suffix}") for card in cards]
    swapped = [v.get("blocks_to_swap", 0) for v in values]
    fp8 = [v.get("fp8_base", False) for v in values]
    assert swapped == sorted(swapped, reverse=True) and swapped[0] < blocks and swapped[-1] == 0
    assert fp8 == sorted(fp8, reverse=True)
    per_step = [v["train_batch_size"] for v in values]
    effective = [v["train_batch_size"] * v["gradient_accumulation_steps"] for v in values]
    assert per_step == sorted(per_step) and effective == sorted(effective)


def test_flux2_dev_has_no_8_gb_preset():
    assert not (HARDWARE / "gpu-8gb-flux2.yaml").exists()
