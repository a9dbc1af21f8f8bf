"""scripts/benchmark_training.py's shaped rows (SD 1.5, SDXL, SD 3.5, Flux), run here on CPU with scaled-down
widths, and its tiny flow rows.

The GPU rows themselves (real widths, 512/1024 px) need CUDA; these tests check that the path a GPU run takes
builds each family's pipeline, applies each preset's options (CPU counterparts where CUDA is needed) and trains the
LoRA through the product's own loop (`finetune.loop.train`), not a copy of it.
"""

import importlib.util
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


spec = importlib.util.spec_from_file_location("benchmark_training", REPO_ROOT / "scripts" / "benchmark_training.py")
bench = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = bench  # dataclasses look their module up while the script is executed
spec.loader.exec_module(bench)

TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, projection_dim=16)
VAE = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4)
NARROW = {
    "sd15": dict(unet=dict(block_out_channels=(32, 32, 32, 32), layers_per_block=1, norm_num_groups=8,
                           cross_attention_dim=16), text=TEXT, vae=VAE),
    "sdxl": dict(unet=dict(block_out_channels=(32, 32, 64), layers_per_block=1, transformer_layers_per_block=(1, 1, 2),
                           attention_head_dim=(2, 2, 4), norm_num_groups=8, cross_attention_dim=32,
                           projection_class_embeddings_input_dim=16 + 6 * 256), text=TEXT, vae=VAE),
    "sd35": dict(transformer=dict(num_layers=1, dual_attention_layers=(0,), attention_head_dim=8, num_attention_heads=2,
                                  joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=32,
                                  pos_embed_max_size=16, sample_size=8), text=TEXT, vae=VAE, t5=dict(
                                      d_model=32, d_kv=8, d_ff=32, num_heads=4, num_layers=1)),
    "flux": dict(transformer=dict(num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
                                  joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)),
                 text=TEXT, vae=VAE, t5=dict(d_model=32, d_kv=8, d_ff=32, num_heads=4, num_layers=1)),
}  # fmt: skip


def test_each_family_gets_its_own_presets():
    names = {s["name"] for s in bench.shaped_settings(["sd15", "sdxl", "sd35", "flux"], steps=1, rank=4)}
    assert "sd15 gpu-8gb" in names and "sdxl gpu-12gb-sdxl" in names
    assert "sd35 gpu-12gb-sd3" in names and "flux gpu-16gb-flux" in names and "flux gpu-12gb-sd3" not in names
    assert not any(n.startswith("sd15") and n.endswith("-sdxl") for n in names)
    assert not any(n.startswith("sdxl") and not n.endswith("-sdxl") for n in names)
    assert not any(n.endswith(" cpu") for n in names)


@pytest.mark.parametrize(
    "kind, preset",
    [("sd15", "gpu-8gb"), ("sdxl", "gpu-8gb-sdxl"), ("sd35", "gpu-12gb-sd3"), ("flux", "gpu-16gb-flux")],
)
def test_shaped_row_trains_the_lora_under_the_preset(kind, preset, tmp_path, monkeypatch):
    from difftune.finetune import loop

    calls = []
    real_train = loop.train
    monkeypatch.setattr(loop, "train", lambda cfg, task: calls.append(task.name) or real_train(cfg, task))
    (setting,) = [s for s in bench.shaped_settings([kind], 1, 4) if s["name"] == f"{kind} {preset}"]
    setting.update(resolution=64, warmup=1, overrides=NARROW[kind], output_dir=str(tmp_path))
    row = bench.shaped_child(setting)
    assert calls == ["lora"]  # timed through the product's loop
    assert row["lora_change"] > 0  # gradients reach the LoRA through checkpointing and accumulation
    assert row["gradient_checkpointing"] and row["batch_size"] == 1 and row["gradient_accumulation_steps"] == 4
    assert "optimizer adamw8bit -> adamw" in row["cpu_substitutes"] and row["mixed_precision"] == "no"
    assert ("quantize_base nf4 -> none" in row["cpu_substitutes"]) == (kind == "sdxl")
    assert ("blocks_to_swap 22 -> 2 (narrowed model)" in row["cpu_substitutes"]) == (kind == "flux")  # fp8 + swap
    assert row["seconds_per_step"] > 0 and row["peak_memory_mb"] > 0


def test_tiny_flow_row_trains_through_the_product_loop(tmp_path):
    row = bench.tiny_flow_child({"name": "tiny sd3", "tiny_flow": "sd3", "cache": True, "steps": 1,
                                 "output_dir": str(tmp_path)})  # fmt: skip
    assert row["cache"] and row["steps"] == 1 and row["seconds_per_step"] > 0
