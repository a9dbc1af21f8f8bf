"""scripts/benchmark_training.py's SD 1.5/SDXL-shaped rows, run here on CPU with scaled-down widths.

The GPU rows themselves (real widths, 512/1024 px) need CUDA; these tests check that the path a GPU run takes
builds each family's UNet, applies each preset's options (CPU counterparts where CUDA is needed) and trains the LoRA.
"""

import importlib.util

import pytest

from finetune.config import REPO_ROOT

spec = importlib.util.spec_from_file_location("benchmark_training", REPO_ROOT / "scripts" / "benchmark_training.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

NARROW = {
    "sd15": dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=8),
    "sdxl": dict(block_out_channels=(32, 32, 64), layers_per_block=1, transformer_layers_per_block=(1, 1, 2),
                 attention_head_dim=(2, 2, 4), norm_num_groups=8, cross_attention_dim=64),
}  # fmt: skip


def test_each_family_gets_its_own_presets():
    names = {s["name"] for s in bench.shaped_settings(["sd15", "sdxl"], steps=1, rank=4, device="cpu")}
    assert "sd15 gpu-8gb" in names and "sdxl gpu-12gb-sdxl" in names
    assert not any(n.startswith("sd15") and n.endswith("-sdxl") for n in names)
    assert not any(n.startswith("sdxl") and not n.endswith("-sdxl") for n in names)
    assert not any(n.endswith(" cpu") for n in names)


@pytest.mark.parametrize("kind, preset", [("sd15", "gpu-8gb"), ("sdxl", "gpu-8gb-sdxl")])
def test_shaped_row_trains_the_lora_under_the_preset(kind, preset):
    (setting,) = [s for s in bench.shaped_settings([kind], 1, 4, "cpu") if s["name"] == f"{kind} {preset}"]
    setting.update(resolution=64, warmup=1, unet_config=NARROW[kind])
    row = bench.shaped_child(setting)
    assert row["lora_change_after_warmup"] > 0  # gradients reach the LoRA through checkpointing and autocast
    assert row["gradient_checkpointing"] and row["batch_size"] == 1 and row["gradient_accumulation_steps"] == 4
    assert "optimizer adamw8bit -> adamw" in row["cpu_substitutes"] and row["mixed_precision"] == "no"
    assert ("quantize_base nf4 -> none" in row["cpu_substitutes"]) == (kind == "sdxl")
    assert row["seconds_per_step"] > 0 and row["peak_memory_mb"] > 0
