"""The Flux LoRA key layout of ComfyUI, kohya's sd-scripts and Forge (Black Forest Labs' module names,
`lora_unet_double_blocks_0_img_attn_qkv`, `lora_unet_single_blocks_0_linear1`, ... with `lora_down`, `lora_up` and
`alpha` per module), and its reading into diffusers' module names for any transformer width.

diffusers splits some of BFL's fused linears into several modules: a double block's `img_attn.qkv` is
`attn.to_q/to_k/to_v`, a single block's `linear1` is `attn.to_q/to_k/to_v` plus `proj_mlp`. A LoRA on a fused
linear (down D: r x in, up U: sum(out_i) x r, scale alpha / r) is exactly one LoRA per part i with the same down D
and the rows of U that give part i's outputs, scaled. diffusers' own converter (`_convert_kohya_flux_lora_to_diffusers`)
assumes Flux.1's width (3072) and fails on narrower transformers; `to_diffusers` reads the widths from the model.
`finetune.kohya_flux` writes the same layout.
"""

from __future__ import annotations

import re

import torch

# BFL name -> the diffusers modules it fuses, in the order of the fused weight's rows.
DOUBLE = {
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "img_attn_proj": ("attn.to_out.0",),
    "img_mlp_0": ("ff.net.0.proj",),
    "img_mlp_2": ("ff.net.2",),
    "img_mod_lin": ("norm1.linear",),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "txt_attn_proj": ("attn.to_add_out",),
    "txt_mlp_0": ("ff_context.net.0.proj",),
    "txt_mlp_2": ("ff_context.net.2",),
    "txt_mod_lin": ("norm1_context.linear",),
}
SINGLE = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": ("proj_out",),
    "modulation_lin": ("norm.linear",),
}
TOP = {  # outside the blocks (kohya's --train_blocks all / ai-toolkit's "everything")
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer_linear": "proj_out",
}
BLOCKS = {"transformer_blocks": ("double_blocks", DOUBLE), "single_transformer_blocks": ("single_blocks", SINGLE)}
SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")
TEXT_PREFIX = "lora_te1_"  # Flux's CLIP encoder in these files


def is_kohya_flux(keys: list[str]) -> bool:
    """Whether every key is a `lora_down`/`lora_up`/`alpha` of this layout (BFL block names or CLIP's)."""
    return any(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) for k in keys) and all(
        k.endswith(SUFFIXES) and k.startswith(("lora_unet_", TEXT_PREFIX)) for k in keys
    )


def _transformer_names(transformer: torch.nn.Module) -> dict[str, tuple[str, ...]]:
    """BFL module name (without `lora_unet_`) -> the transformer's diffusers modules it fuses."""
    names = {bfl: (module,) for bfl, module in TOP.items()}
    for blocks, (bfl_blocks, layout) in BLOCKS.items():
        for index in range(len(getattr(transformer, blocks, ()))):
            for bfl, parts in layout.items():
                names[f"{bfl_blocks}_{index}_{bfl}"] = tuple(f"{blocks}.{index}.{part}" for part in parts)
    return names


def _text_names(text_encoder: torch.nn.Module | None) -> dict[str, str]:
    """kohya's module name (without `lora_te1_`) -> the text encoder's module path; a file names CLIP's modules
    `text_model_encoder_...` whether or not this transformers version has the `text_model` level."""
    if text_encoder is None:
        return {}
    out = {}
    for name, module in text_encoder.named_modules():
        if isinstance(module, torch.nn.Linear):
            flat = name.replace(".", "_")
            out[flat if flat.startswith("text_model_") else f"text_model_{flat}"] = name
    return out


def to_diffusers(
    state: dict[str, torch.Tensor], transformer: torch.nn.Module, text_encoder: torch.nn.Module | None
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The file's LoRA in diffusers' peft keys (`transformer.<module>.lora_A.weight`, `lora_B` with the scale
    alpha / rank folded in), and the file's module names this layout does not know (empty when all are known). A
    known module whose shapes do not fit this model is a `ValueError` naming it."""
    denoiser, text = _transformer_names(transformer), _text_names(text_encoder)
    modules = sorted({re.sub(r"\.(lora_down\.weight|lora_up\.weight|alpha)$", "", k) for k in state})
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name in modules:
        down, up = state.get(f"{name}.lora_down.weight"), state.get(f"{name}.lora_up.weight")
        if down is None or up is None:
            unknown.append(name)
            continue
        rank = down.shape[0]
        alpha = state.get(f"{name}.alpha")
        scale = (float(alpha) / rank) if alpha is not None else 1.0
        if name.startswith("lora_unet_") and name.removeprefix("lora_unet_") in denoiser:
            targets = [(f"transformer.{part}", transformer.get_submodule(part)) for part in denoiser[name[10:]]]
        elif name.startswith(TEXT_PREFIX) and name.removeprefix(TEXT_PREFIX) in text:
            path = text[name.removeprefix(TEXT_PREFIX)]
            targets = [(f"text_encoder.{path}", text_encoder.get_submodule(path))]
        else:
            unknown.append(name)
            continue
        widths = [module.weight.shape[0] for _, module in targets]
        if sum(widths) != up.shape[0] or any(module.weight.shape[1] != down.shape[1] for _, module in targets):
            raise ValueError(
                f"{name} maps {down.shape[1]} -> {up.shape[0]} features, this model's "
                f"{'/'.join(path for path, _ in targets)} {targets[0][1].weight.shape[1]} -> {sum(widths)}"
            )
        for (path, _), rows in zip(targets, torch.split(up, widths), strict=True):
            out[f"{path}.lora_A.weight"] = down
            out[f"{path}.lora_B.weight"] = rows * scale
    return out, unknown
