"""A Flux LoRA in the key layout ComfyUI, kohya's sd-scripts and Forge load: Black Forest Labs' module names
(`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_0_linear1`, ...), with `lora_down`,
`lora_up` and `alpha` per module.

diffusers splits some of BFL's fused linears into several modules: a double block's `img_attn.qkv` is
`attn.to_q/to_k/to_v`, a single block's `linear1` is `attn.to_q/to_k/to_v` plus `proj_mlp` (the table is
`pipelines.kohya_flux`, which reads such files back). diffusers converts such files to its layout but not back, so
the writing direction is here.
Separate LoRAs (A_i, B_i, scale s_i) on the parts of a fused linear are one LoRA on the fused weight, exactly:
down = [A_1; A_2; ...] stacked, up = the block-diagonal of s_i B_i (rows of an unadapted part stay zero), alpha =
the fused rank (scale 1). The result is the same weight delta, so the same images.
"""

from __future__ import annotations

import torch

from difftune.core.errors import UserError
from difftune.finetune.lora_keys import check_plain_lora
from difftune.pipelines.kohya_flux import BLOCKS, TOP


def flux_kohya_layers(transformer: torch.nn.Module, adapter: str) -> dict[str, torch.Tensor]:
    """The adapter `adapter` of a peft-wrapped `FluxTransformer2DModel` in BFL/kohya keys."""
    check_plain_lora(transformer, adapter)
    lora = {name: module for name, module in transformer.named_modules() if adapter in getattr(module, "lora_A", {})}
    out: dict[str, torch.Tensor] = {}
    for blocks, (bfl_blocks, layout) in BLOCKS.items():
        for index in range(len(getattr(transformer, blocks))):
            for bfl, parts in layout.items():
                names = [f"{blocks}.{index}.{part}" for part in parts]
                if any(name in lora for name in names):
                    out.update(_fused(f"lora_unet_{bfl_blocks}_{index}_{bfl}", names, lora, transformer, adapter))
                    for name in names:
                        lora.pop(name, None)
    for bfl, name in TOP.items():
        if name in lora:
            out.update(_fused(f"lora_unet_{bfl}", [name], lora, transformer, adapter))
            lora.pop(name)
    if lora:
        raise UserError(f"--output_kohya_format: Flux kohya files have no key for {sorted(lora)[:3]} ({len(lora)} "
                        "modules); train the default targets or drop the flag")  # fmt: skip
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
