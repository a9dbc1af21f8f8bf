"""Writing results in the formats users' tools read: diffusers LoRA files, kohya LoRA files, model cards.

The LoRA file is diffusers' (`pytorch_lora_weights.safetensors`, keys `unet.`/`text_encoder.`) with peft's
adapter config in the safetensors metadata, so `pipe.load_lora_weights(dir)` restores `lora_alpha` even when it
differs from the rank. Conversion uses diffusers' utilities; nothing here renames keys by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

LORA_FILE = "pytorch_lora_weights.safetensors"
KOHYA_FILE = "pytorch_lora_weights_kohya.safetensors"


def _adapter_metadata(model: torch.nn.Module) -> dict:
    config = model.peft_config["default"].to_dict()
    return json.loads(json.dumps(config, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))


def save_lora(unet: torch.nn.Module, output_dir: Path, text_encoder: torch.nn.Module | None = None) -> Path:
    """Writes the adapter(s) in diffusers format; returns the file."""
    unet_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    te_layers, te_meta = None, None
    if text_encoder is not None and getattr(text_encoder, "peft_config", None):
        te_layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(text_encoder))
        te_meta = _adapter_metadata(text_encoder)
    StableDiffusionPipeline.save_lora_weights(
        output_dir, unet_lora_layers=unet_layers, text_encoder_lora_layers=te_layers,
        unet_lora_adapter_metadata=_adapter_metadata(unet), text_encoder_lora_adapter_metadata=te_meta,
        safe_serialization=True,
    )  # fmt: skip
    return output_dir / LORA_FILE


def save_lora_kohya(unet: torch.nn.Module, output_dir: Path) -> Path:
    """The same adapter with kohya/A1111 key names (`lora_unet_*`, `.lora_down/.lora_up/.alpha`)."""
    peft_sd = get_peft_model_state_dict(unet)
    alpha = float(unet.peft_config["default"].lora_alpha)
    kohya = convert_state_dict_to_kohya({f"unet.{k}": v for k, v in peft_sd.items()}, alpha_dict=None)
    for key in [k for k in kohya if k.endswith(".lora_down.weight")]:
        kohya[key.replace(".lora_down.weight", ".alpha")] = torch.tensor(alpha)
    path = output_dir / KOHYA_FILE
    save_file({k: v.contiguous() for k, v in kohya.items()}, path)
    return path


def write_model_card(output_dir: Path, base_model: str, kind: str, cfg, extra: str = "") -> Path:
    """README.md with YAML front matter (base_model, tags) and the settings that made the result."""
    tags = ["stable-diffusion", "text-to-image", "diffusers", "difftune", kind]
    settings = {
        k: getattr(cfg, k)
        for k in ("resolution", "train_batch_size", "gradient_accumulation_steps", "max_train_steps", "learning_rate",
                  "lr_scheduler", "rank", "lora_alpha", "mixed_precision", "snr_gamma", "noise_offset", "seed")
    }  # fmt: skip
    lines = [
        "---",
        f"base_model: {base_model}",
        "library_name: diffusers",
        "tags:",
        *[f"- {t}" for t in tags],
        "---",
        "",
        f"# {kind} fine-tune of {base_model}",
        "",
        "Trained with [difftune](https://github.com/difftune/difftune).",
        "",
    ]
    if cfg.validation_prompt:
        lines += ["Validation prompts: " + "; ".join(f"`{p}`" for p in cfg.validation_prompt), ""]
    lines += ["## Training settings", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in settings.items()]
    if kind == "lora":
        lines += ["", "## Use", "", "```python", "from diffusers import DiffusionPipeline",
                  f'pipe = DiffusionPipeline.from_pretrained("{base_model}")',
                  'pipe.load_lora_weights("<this folder or repo>")', "```"]  # fmt: skip
    if extra:
        lines += ["", extra]
    path = output_dir / "README.md"
    path.write_text("\n".join(lines) + "\n")
    return path
