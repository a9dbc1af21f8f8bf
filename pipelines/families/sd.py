"""Stable Diffusion 1.x and 2.x: `StableDiffusionPipeline`, a UNet conditioned on one CLIP text encoder's last
hidden state, trained with epsilon (SD 1.x, SD 2 base) or v-prediction (SD 2 768-v) on a DDPM schedule.

SD 2.x is told apart by its scheduler's `prediction_type` (v) or its UNet's 1024-wide cross-attention (OpenCLIP
ViT-H, SD 2 base); training and generation both ask `pipelines.families.detect`, so they agree.
"""

from __future__ import annotations

from typing import ClassVar

from diffusers import DDPMScheduler

from difftune.core.errors import UserError
from difftune.pipelines.families.base import Family, sub_config


class StableDiffusion1(Family):
    name: ClassVar[str] = "sd1"
    pipeline_class_name: ClassVar[str] = "StableDiffusionPipeline"

    @classmethod
    def matches(cls, index: dict, model: str) -> bool:
        return index.get("_class_name") == cls.pipeline_class_name

    @classmethod
    def load_noise_scheduler(cls, model: str, prediction_type: str | None = None, rescale_betas_zero_snr=False):
        scheduler = DDPMScheduler.from_pretrained(
            model, subfolder="scheduler", rescale_betas_zero_snr=rescale_betas_zero_snr
        )
        if prediction_type is not None:
            scheduler.register_to_config(prediction_type=prediction_type)
        cls.check_settings(
            model, {}, {"prediction_type": prediction_type, "rescale_betas_zero_snr": rescale_betas_zero_snr}
        )
        return scheduler

    @classmethod
    def check_settings(cls, model: str, index: dict, options: dict) -> None:
        """Zero terminal SNR with v-prediction only: at the last timestep the input is pure noise, so an epsilon
        prediction of it says nothing about the image and samplers divide by its zero signal (Lin et al. 2024,
        section 3.2)."""
        if not options.get("rescale_betas_zero_snr"):
            return
        predicts = options.get("prediction_type") or sub_config(model, "scheduler", "scheduler_config.json").get(
            "prediction_type", "epsilon"
        )
        if predicts != "v_prediction":
            raise UserError(
                f"--rescale_betas_zero_snr needs v-prediction, and {model}'s scheduler predicts {predicts}: add "
                "--prediction_type v_prediction"
            )

    @classmethod
    def from_pretrained_kwargs(cls, index: dict, model: str) -> dict:
        """What `from_pretrained` needs besides the folder: SD 1/2 without their safety checker."""
        return {"safety_checker": None, "requires_safety_checker": False}

    def pipeline_extras(self) -> dict:
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}

    def encode_text(self, ids, encoders=None) -> dict:
        encoder = (encoders or self.text_encoders())["text_encoder"]
        return {"encoder_hidden_states": encoder(ids["input_ids"].to(next(encoder.parameters()).device))[0]}

    def predict(self, denoiser, noisy, timesteps, cond, batch):
        return denoiser(noisy, timesteps, cond["encoder_hidden_states"].to(noisy.dtype), return_dict=False)[0]


class StableDiffusion2(StableDiffusion1):
    name: ClassVar[str] = "sd2"

    @classmethod
    def matches(cls, index: dict, model: str) -> bool:
        if not super().matches(index, model):
            return False
        scheduler = sub_config(model, "scheduler", "scheduler_config.json")
        unet = sub_config(model, "unet")
        return scheduler.get("prediction_type") == "v_prediction" or unet.get("cross_attention_dim") == 1024
