"""An adapter's weights under the key names LoRA files use: peft's keys below the module path files keep (diffusers'
format), and kohya's (`lora_unet_*`, `lora_te1_*`, ... with `.lora_down.weight`, `.lora_up.weight`, `.alpha`) for
diffusers' UNet and CLIP module names. A Flux transformer's kohya keys are Black Forest Labs' module names
(`finetune.kohya_flux`). Key conversion is diffusers' `convert_state_dict_to_kohya`; only what it gets wrong is fixed
here (see `kohya_layers`).
"""

from __future__ import annotations

import torch
from diffusers.utils import convert_state_dict_to_kohya
from peft.utils import PeftType, get_peft_model_state_dict

from difftune.core.errors import UserError
from difftune.finetune.adapters import ADAPTER_NAME as ADAPTER


def lora_state_dict(model: torch.nn.Module, prefix: str) -> tuple[dict[str, torch.Tensor], str]:
    """peft's state dict of the adapter, and the module path to put before its keys in files.

    transformers >= 5 flattened `CLIPTextModel` (no `text_model.` level). LoRA files everywhere else (A1111,
    ComfyUI, kohya, older diffusers) name text-encoder modules `text_model.encoder...`, and diffusers' loader
    strips the level again for flattened encoders, so files keep it."""
    state_dict = get_peft_model_state_dict(model)
    path = "text_model." if prefix.startswith("text_encoder") and not hasattr(model, "text_model") else ""
    return state_dict, path


def check_plain_lora(model: torch.nn.Module, adapter: str = ADAPTER) -> None:
    """A `UserError` unless the adapter is a plain LoRA: kohya files have no keys for DoRA, LoHa or LoKr."""
    config = model.peft_config[adapter]
    if config.peft_type != PeftType.LORA or getattr(config, "use_dora", False):
        kind = "DoRA" if getattr(config, "use_dora", False) else str(config.peft_type.value)
        raise UserError(f"--output_kohya_format writes plain LoRA only; this adapter is {kind}")


def kohya_layers(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """One model's adapter in kohya keys. `prefix` is its name in diffusers' files (`unet`, `text_encoder`, ...).

    `convert_state_dict_to_kohya` renames lora_A/lora_B to lora_down/lora_up and module paths to `lora_unet_*`,
    `lora_te1_*`, `lora_te2_*`, but sets every `.alpha` to the rank (scale 1). peft scales by lora_alpha / r
    (lora_alpha / sqrt(r) with rslora, per module with alpha_pattern), so the alpha is replaced by the module's
    own scale x rank. It also mislabels DoRA magnitudes and cannot express LoHa/LoKr: those are refused.
    """
    check_plain_lora(model)
    peft_sd, path = lora_state_dict(model, prefix)
    kohya: dict[str, torch.Tensor] = {}
    modules = [key.removesuffix(".lora_A.weight") for key in peft_sd if key.endswith(".lora_A.weight")]
    for name in modules:
        down, up = f"{name}.lora_A.weight", f"{name}.lora_B.weight"
        pair = {f"{prefix}.{path}{down}": peft_sd[down], f"{prefix}.{path}{up}": peft_sd[up]}
        layer = convert_state_dict_to_kohya(pair)
        lora = model.get_submodule(name)
        (alpha_key,) = [k for k in layer if k.endswith(".alpha")]
        layer[alpha_key] = torch.tensor(float(lora.scaling[ADAPTER] * lora.r[ADAPTER]))
        kohya.update(layer)
    if len(peft_sd) != 2 * len(modules):  # e.g. LoRA biases: kohya has no key for them
        extra = sorted(set(peft_sd) - {f"{n}.lora_{ab}.weight" for n in modules for ab in "AB"})
        raise UserError(f"--output_kohya_format: kohya files cannot hold {extra[:3]} ({len(extra)} tensors)")
    return kohya
