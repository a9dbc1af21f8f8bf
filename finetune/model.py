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
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from core.errors import UserError

UNET_ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_ATTENTION = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class Components:
    family: str  # sd1 | sd2 | sdxl
    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler
    model_index: dict
    tokenizer_2: CLIPTokenizer | None = None  # SDXL
    text_encoder_2: CLIPTextModelWithProjection | None = None

    def text_encoders(self) -> list[torch.nn.Module]:
        return [m for m in (self.text_encoder, self.text_encoder_2) if m is not None]

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """Token ids (B, L) for each tokenizer: `input_ids` and, for SDXL, `input_ids_2`."""
        out = {}
        for key, tok in (("input_ids", self.tokenizer), ("input_ids_2", self.tokenizer_2)):
            if tok is not None:
                out[key] = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                               return_tensors="pt").input_ids  # fmt: skip
        return out

    def encode_text(self, ids: dict[str, torch.Tensor], encoders: list | None = None) -> dict[str, torch.Tensor]:
        """UNet conditioning: `encoder_hidden_states` (B, L, D) and, for SDXL, pooled `text_embeds` (B, D2).

        SD 1/2 use the last hidden state; SDXL concatenates both encoders' penultimate hidden states and takes the
        pooled projection of the second, as diffusers' SDXL pipeline does. `encoders` overrides the modules
        (e.g. the accelerate-wrapped ones being trained)."""
        te1, te2 = encoders or (self.text_encoder, self.text_encoder_2)
        device = next(te1.parameters()).device
        if self.family != "sdxl":
            return {"encoder_hidden_states": te1(ids["input_ids"].to(device))[0]}
        out1 = te1(ids["input_ids"].to(device), output_hidden_states=True)
        out2 = te2(ids["input_ids_2"].to(device), output_hidden_states=True)
        hidden = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        return {"encoder_hidden_states": hidden, "text_embeds": out2[0]}


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


def load_components(
    name_or_path: str, prediction_type: str | None = None, rescale_betas_zero_snr: bool = False, unet=None
) -> Components:
    """Every component of the pipeline at `name_or_path`; `unet` replaces the UNet (e.g. a quantised one)."""
    model_index = read_model_index(name_or_path)
    noise_scheduler = DDPMScheduler.from_pretrained(
        name_or_path, subfolder="scheduler", rescale_betas_zero_snr=rescale_betas_zero_snr
    )
    family = detect_family(model_index, dict(noise_scheduler.config))
    if prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=prediction_type)
    sdxl = family == "sdxl"
    return Components(
        family=family,
        tokenizer=CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer"),
        text_encoder=CLIPTextModel.from_pretrained(name_or_path, subfolder="text_encoder"),
        vae=AutoencoderKL.from_pretrained(name_or_path, subfolder="vae"),
        unet=unet or UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet"),
        noise_scheduler=noise_scheduler,
        model_index=model_index,
        tokenizer_2=CLIPTokenizer.from_pretrained(name_or_path, subfolder="tokenizer_2") if sdxl else None,
        text_encoder_2=(
            CLIPTextModelWithProjection.from_pretrained(name_or_path, subfolder="text_encoder_2") if sdxl else None
        ),
    )


def vae_scale_factor(vae: AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def freeze(*modules: torch.nn.Module) -> None:
    for module in modules:
        module.requires_grad_(False)
        module.eval()


def adapter_config(kind: str, rank: int, alpha: float | None, dropout: float, target_modules: list[str] | None):
    """A peft config: LoRA (Hu et al. 2021), DoRA (Liu et al. 2024), LoHa or LoKr (LyCORIS, Yeh et al. 2024)."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    alpha = alpha if alpha is not None else rank
    targets = target_modules or UNET_ATTENTION
    if kind in ("lora", "dora"):
        return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, init_lora_weights="gaussian",
                          target_modules=targets, use_dora=kind == "dora")  # fmt: skip
    if kind == "loha":
        return LoHaConfig(r=rank, alpha=alpha, rank_dropout=dropout, module_dropout=0.0, target_modules=targets)
    if kind == "lokr":
        return LoKrConfig(r=rank, alpha=alpha, rank_dropout=dropout, module_dropout=0.0, target_modules=targets)
    raise UserError(f"--adapter {kind}: choose lora, dora, loha or lokr")


def lora_config(rank: int, alpha: float | None, dropout: float, target_modules: list[str] | None):
    return adapter_config("lora", rank, alpha, dropout, target_modules)


def add_adapter(model: torch.nn.Module, config) -> list[torch.nn.Parameter]:
    """Attaches a peft adapter (named "default"); returns its trainable parameters, upcast to fp32.

    peft's `inject_adapter_in_model` works for the UNet and for transformers' text encoders alike (the
    transformers `add_adapter` wrapper refuses some peft versions)."""
    from peft import inject_adapter_in_model

    try:
        inject_adapter_in_model(config, model, "default")
    except ValueError as err:
        raise UserError(f"--target_modules {sorted(config.target_modules)}: {str(err).splitlines()[0]}") from err
    model.peft_config = {"default": config}
    if hasattr(model, "_hf_peft_config_loaded"):
        model._hf_peft_config_loaded = True
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def add_unet_lora(unet: UNet2DConditionModel, config) -> list[torch.nn.Parameter]:
    return add_adapter(unet, config)
