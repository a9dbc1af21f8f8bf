"""A Flux LoRA in the key layout ComfyUI, kohya's sd-scripts and Forge load: Black Forest Labs' module names
(`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_0_linear1`, ...), with `lora_down`,
`lora_up` and `alpha` per module. Flux.1 (and Chroma, the same blocks without per-block modulation) and Flux.2 each
have their layout (`FLUX1`, `FLUX2`): ComfyUI maps diffusers' Flux.1 names onto its modules but not Flux.2's
(`ff.linear_in`, `to_qkv_mlp_proj`), so a Flux.2 LoRA for ComfyUI takes BFL's names.

diffusers splits some of BFL's fused linears into several modules: a double block's `img_attn.qkv` is
`attn.to_q/to_k/to_v`, a single block's `linear1` is `attn.to_q/to_k/to_v` plus `proj_mlp` (the table is
`pipelines.kohya_flux`, which reads such files back). diffusers converts such files to its layout but not back, so
the writing direction is here.
Separate LoRAs (A_i, B_i, scale s_i) on the parts of a fused linear are one LoRA on the fused weight, exactly:
down = [A_1; A_2; ...] stacked, up = the block-diagonal of s_i B_i (rows of an unadapted part stay zero), alpha =
the fused rank (scale 1). The result is the same weight delta, so the same images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from difftune.core.errors import UserError
from difftune.finetune.lora_keys import check_plain_lora
from difftune.pipelines.kohya_flux import DOUBLE, SINGLE, TOP

# Flux.2 (`Flux2Transformer2DModel`): the single blocks' linear1 is one diffusers module already; the modulations are
# shared across blocks (`double_stream_modulation_*`), outside BFL's per-block names.
DOUBLE2 = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.linear_in",),
    "img_mlp_2": ("ff.linear_out",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.linear_in",),
    "txt_mlp_2": ("ff_context.linear_out",),
}
SINGLE2 = {"linear1": ("attn.to_qkv_mlp_proj",), "linear2": ("attn.to_out",)}
TOP2 = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "final_layer_linear": "proj_out",
}


@dataclass(frozen=True)
class Layout:
    """BFL's names of one Flux generation: per diffusers block list, BFL's name for it and its fused linears; the
    linears outside the blocks."""

    name: str
    blocks: dict[str, tuple[str, dict[str, tuple[str, ...]]]]
    top: dict[str, str]


FLUX1 = Layout(
    "Flux",
    {"transformer_blocks": ("double_blocks", DOUBLE), "single_transformer_blocks": ("single_blocks", SINGLE)},
    TOP,
)
FLUX2 = Layout(
    "Flux.2",
    {"transformer_blocks": ("double_blocks", DOUBLE2), "single_transformer_blocks": ("single_blocks", SINGLE2)},
    TOP2,
)


def flux_kohya_layers(transformer: torch.nn.Module, adapter: str, layout: Layout = FLUX1) -> dict[str, torch.Tensor]:
    """The adapter `adapter` of a peft-wrapped Flux transformer (`layout`'s generation) in BFL/kohya keys."""
    check_plain_lora(transformer, adapter)
    lora = {name: module for name, module in transformer.named_modules() if adapter in getattr(module, "lora_A", {})}
    out: dict[str, torch.Tensor] = {}
    for blocks, (bfl_blocks, fusions) in layout.blocks.items():
        for index in range(len(getattr(transformer, blocks))):
            for bfl, parts in fusions.items():
                names = [f"{blocks}.{index}.{part}" for part in parts]
                if any(name in lora for name in names):
                    out.update(_fused(f"lora_unet_{bfl_blocks}_{index}_{bfl}", names, lora, transformer, adapter))
                    for name in names:
                        lora.pop(name, None)
    for bfl, name in layout.top.items():
        if name in lora:
            out.update(_fused(f"lora_unet_{bfl}", [name], lora, transformer, adapter))
            lora.pop(name)
    if lora:
        raise UserError(f"--output_kohya_format: {layout.name} kohya files have no key for {sorted(lora)[:3]} "
                        f"({len(lora)} modules); train the default targets or drop the flag")  # fmt: skip
    return out


def _fused(key: str, names: list[str], lora: dict, transformer: torch.nn.Module, adapter: str) -> dict:
    if len(names) == 1:  # one module: its own rank, and its scale as alpha, as kohya writes it
        module = lora[names[0]]
        return {f"{key}.lora_down.weight": module.lora_A[adapter].weight,
                f"{key}.lora_up.weight": module.lora_B[adapter].weight,
                f"{key}.alpha": torch.tensor(float(module.scaling[adapter] * module.r[adapter]))}  # fmt: skip
    downs, ups = [], []
    for name in names:
        if name in lora:
            module = lora[name]
            downs.append(module.lora_A[adapter].weight)
            ups.append(module.lora_B[adapter].weight * module.scaling[adapter])
        else:
            ups.append(torch.zeros(transformer.get_submodule(name).weight.shape[0], 0))
    down = torch.cat(downs)
    up = torch.block_diag(*[u.detach().float() for u in ups]).to(down.dtype)
    return {
        f"{key}.lora_down.weight": down,
        f"{key}.lora_up.weight": up,
        f"{key}.alpha": torch.tensor(float(len(down))),
    }
