"""The released shapes of the 2026 families (`scripts/shaped_models.py`, configs only): each component has the
published parameter count, and the memory planner plans each family's LoRA step from the configs alone (narrowed
widths here; the presets' figures at full size are `test_planner`'s slow test)."""

from __future__ import annotations

import pytest
import torch

from difftune.core.config import compose
from difftune.finetune import planner
from difftune.finetune.config import LoraTrainConfig
from difftune.finetune.tasks import LORA
from difftune.scripts.shaped_models import shaped_parts, write_shaped_configs

# Billions of parameters, as the model cards state them (Qwen2.5-VL-7B with its 0.67B vision tower, Mistral Small
# 3.1 24B with Pixtral's, T5-XXL's encoder 4.76B).
RELEASED = {
    "qwen_image": {"transformer": 20.4, "text_encoder": 8.3},
    "flux2": {"transformer": 32.2, "text_encoder": 24.0},
    "flux2_klein": {"transformer": 3.9, "text_encoder": 4.0},
    "z_image": {"transformer": 6.2, "text_encoder": 4.0},
    "chroma": {"transformer": 8.9, "text_encoder": 4.8},
}
# A few blocks of each at a small width, every architectural feature kept (Flux.2 reads text layers 10, 20 and 30,
# klein 9, 18 and 27, so their LLMs keep that depth).
NARROW = {
    "qwen_image": dict(transformer=dict(num_layers=2, num_attention_heads=2, attention_head_dim=32,
                                        joint_attention_dim=64, axes_dims_rope=(8, 12, 12)),
                       text=dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 num_key_value_heads=1, rope_scaling={"type": "mrope", "mrope_section": [4, 6, 6]})),
    "flux2": dict(transformer=dict(num_layers=1, num_single_layers=2, num_attention_heads=2, attention_head_dim=32,
                                   joint_attention_dim=3 * 64, axes_dims_rope=(8, 8, 8, 8)),
                  text=dict(hidden_size=64, intermediate_size=64, num_hidden_layers=31, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=32)),
    "flux2_klein": dict(transformer=dict(num_layers=1, num_single_layers=2, num_attention_heads=2,
                                         attention_head_dim=32, joint_attention_dim=3 * 64, axes_dims_rope=(8, 8, 8, 8)),
                        text=dict(hidden_size=64, intermediate_size=64, num_hidden_layers=28, num_attention_heads=2,
                                  num_key_value_heads=1, head_dim=32)),
    "z_image": dict(transformer=dict(dim=64, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=64,
                                     axes_dims=[8, 12, 12]),
                    text=dict(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              num_key_value_heads=1, head_dim=32)),
    "chroma": dict(transformer=dict(num_layers=1, num_single_layers=2, num_attention_heads=2, attention_head_dim=32,
                                    joint_attention_dim=64, axes_dims_rope=(8, 12, 12), approximator_hidden_dim=64,
                                    approximator_layers=1),
                   t5=dict(d_model=64, d_kv=32, d_ff=64, num_layers=1, num_heads=2)),
}  # fmt: skip


@pytest.mark.parametrize("kind", RELEASED)
def test_the_shapes_have_the_released_parameter_counts(kind):
    import diffusers
    import transformers

    for name, billions in RELEASED[kind].items():
        library, cls_name, config = shaped_parts(kind)[name]
        cls = getattr(diffusers if library == "diffusers" else transformers, cls_name)
        with torch.device("meta"):
            module = cls.from_config(config) if library == "diffusers" else cls(cls.config_class(**config))
        assert sum(p.numel() for p in module.parameters()) / 1e9 == pytest.approx(billions, abs=0.05), name


@pytest.mark.parametrize("kind", RELEASED)
def test_the_planner_plans_each_family_from_its_configs(kind, tmp_path):
    model = write_shaped_configs(kind, tmp_path / kind, NARROW[kind])
    plan = planner.predict(lora_cfg(model, resolution=256), LORA, detail=False)
    phases = plan.trace.phases
    assert set(phases) == {"caching", "training step"}
    assert phases["training step"].by_category["trainable weights"] > 0
    text = sum(t.numel() * 2 for t in plan.trace.run.family.parts["text_encoder"].parameters())  # bf16
    assert phases["caching"].total >= text  # the text pass: the encoder alone on the device of an unlimited card


def test_t5_encodes_on_a_12_gb_card_and_leaves_before_the_vae_encodes(tmp_path):
    """Chroma at full size on a 12 GB card: T5-XXL (8.9 GiB) fits the card alone and encodes the captions there,
    then leaves before the VAE encodes the images; no phase exceeds the card."""
    model = write_shaped_configs("chroma", tmp_path / "chroma")
    cfg = lora_cfg(model, resolution=1024, fp8_base=True, blocks_to_swap=16, gradient_accumulation_steps=4)
    plan = planner.predict(cfg, LORA, detail=False, card_gib=12)
    t5 = sum(t.numel() * 2 for t in plan.trace.run.family.parts["text_encoder"].parameters())
    assert text_on_device(plan.trace.phases["caching"]) >= t5
    assert plan.predicted < 12 * planner.GIB


def lora_cfg(model, **settings):
    base = dict(mixed_precision="bf16", gradient_checkpointing=True)
    return planner.planned_config(compose(LoraTrainConfig, dict(pretrained_model_name_or_path=str(model))),
                                  {**base, **settings})  # fmt: skip


def text_on_device(snapshot) -> int:
    return sum(nbytes for name, nbytes in snapshot.by_category.items() if name.startswith("text_encoder weights"))
