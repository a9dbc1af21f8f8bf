"""Loading the base pipeline's components for training, detecting its family, and attaching adapters.

The family (sd1, sd2, sdxl) comes from the pipeline's `model_index.json` and scheduler config; the user never
names it. Adapters are peft configs attached with diffusers' `add_adapter`; nothing here writes a layer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from pipelines.errors import UserError

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass
class Components:
    family: str  # sd1 | sd2 | sdxl
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    model_index: dict


def read_model_index(name_or_path: str) -> dict:
    """model_index.json of a local folder or (only if it is not a folder) a Hub id; UserError if neither."""
    path = Path(name_or_path)
    if path.is_dir():
        index = path / "model_index.json"
        if not index.exists():
            raise UserError(
                f"--pretrained_model_name_or_path {name_or_path}: no model_index.json; "
                "point it at a diffusers pipeline folder"
            )
        return json.loads(index.read_text())
    looks_like_hub_id = name_or_path.count("/") == 1 and not name_or_path.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise UserError(f"--pretrained_model_name_or_path {name_or_path}: no such folder")
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(name_or_path, "model_index.json")).read_text())
    except Exception as err:
        raise UserError(
            f"--pretrained_model_name_or_path {name_or_path}: could not fetch it from the Hub "
            f"({type(err).__name__}); check the id, your login and the network"
        ) from err


def detect_family(model_index: dict, scheduler_config: dict) -> str:
    name = model_index.get("_class_name", "")
    if "XL" in name:
        return "sdxl"
    if "StableDiffusion" not in name:
        raise UserError(f"unsupported pipeline {name!r}: difftune trains Stable Diffusion 1.x, 2.x and SDXL")
    return "sd2" if scheduler_config.get("prediction_type") == "v_prediction" else "sd1"


def load_components(name_or_path: str, prediction_type: str | None = None) -> Components:
    model_index = read_model_index(name_or_path)
    noise_scheduler = DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler")
    family = detect_family(model_index, dict(noise_scheduler.config))
    if prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=prediction_type)
    if family == "sdxl":
        raise UserError(f"{name_or_path} is an SDXL pipeline; SDXL training is not supported by this version yet")
    return Components(
        family=family,
        tokenizer=CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder"),
        vae=AutoencoderKL.from_pretrained(name_or_path, subfolder="vae"),
        unet=UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet"),
        noise_scheduler=noise_scheduler,
        model_index=model_index,
    )


def vae_scale_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def freeze(*modules: torch.nn.Module) -> None:
    for module in modules:
        module.requires_grad_(False)
        module.eval()


def lora_config(rank: int, alpha: float | None, dropout: float, target_modules: list[str] | None):
    from peft import LoraConfig

    return LoraConfig(
        r=rank,
        lora_alpha=alpha if alpha is not None else rank,
        lora_dropout=dropout,
        init_lora_weights="gaussian",
        target_modules=target_modules or UNET_ATTENTION,
    )


def add_unet_lora(unet: UNet2DConditionModel, config) -> list[torch.nn.Parameter]:
    """Attaches the adapter; returns its (trainable, fp32) parameters."""
    try:
        unet.add_adapter(config)
    except ValueError as err:
        raise UserError(f"--target_modules {config.target_modules}: {str(err).splitlines()[0]}") from err
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params
