"""Validation images during training: generated with the weights being trained, saved and logged.

The pipeline is assembled around the live modules without casting them (casting the shared UNet to fp16 is the
cause of diffusers' "Attempting to unscale FP16 gradients" reports); autocast handles mixed precision.

An edit model's validation images are edits: each prompt applied to held-out input images (`--validation_image`,
or the control images of the held-out pairs of `--validation_split` / `--validation_data_dir`), so the instruction
is seen on inputs the model did not train on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from difftune.core.config import PASSIVE, option
from difftune.core.errors import UserError
from difftune.core.images import make_grid
from difftune.finetune.data import EDIT


@dataclass
class ValidationConfig:
    """Validation images: prompts sampled with the live weights every --validation_steps."""

    validation_prompt: list[str] | None = option("Prompts for validation images.", default=None, resume=PASSIVE,
                                                 card=False)  # fmt: skip
    num_validation_images: int = option("Images per validation prompt.", default=4, resume=PASSIVE, card=False)
    validation_steps: int = option("Validation images and validation loss every N steps.", default=100,
                                   resume=PASSIVE, card=False)  # fmt: skip
    validation_inference_steps: int = option("Sampler steps for validation images.", default=20, resume=PASSIVE,
                                             card=False)  # fmt: skip
    validation_image: list[str] | None = option(
        "Edit models: input images the validation prompts edit (default: the held-out pairs' control images).",
        default=None, resume=PASSIVE, card=False, families=EDIT,
    )  # fmt: skip

    def validate(self) -> None:
        for name in ("validation_steps", "num_validation_images", "validation_inference_steps"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name} must be at least 1")
        for path in self.validation_image or []:
            if not Path(path).is_file():
                raise UserError(f"--validation_image {path} not found")


def edit_inputs(cfg, family_cls, held_out) -> list[list[Image.Image]]:
    """The input images (each a list of references) an edit model's validation prompts edit, read before the model
    loads; [] for a text-to-image model or without --validation_prompt."""
    if not family_cls.max_controls or not cfg.validation.validation_prompt:
        return []
    if cfg.validation.validation_image:
        from difftune.core.imagefolder import open_source

        return [[open_source(path)] for path in cfg.validation.validation_image]
    if held_out is None:
        raise UserError(
            "--validation_prompt on an edit model needs input images to edit: --validation_image FILE, or held-out "
            "pairs (--validation_split or --validation_data_dir)"
        )
    return held_out.controls[: cfg.validation.num_validation_images]


@torch.no_grad()
def log_validation(
    family, models: dict, accelerator, cfg, step: int, weight_dtype, inputs: list[list[Image.Image]] = ()
) -> list[Image.Image]:
    """Images of each `--validation_prompt` from the live modules (`models`: the trained ones, as prepared), saved
    under `validation/step-N/` with a grid, and logged to tensorboard; for an edit model, one edit of each of
    `inputs` (`edit_inputs`) per prompt. Call it on every process; the main one works."""
    if not accelerator.is_main_process:
        return []
    live = {name: accelerator.unwrap_model(model) for name, model in models.items()}
    was_training = {name: module.training for name, module in live.items()}
    for module in live.values():
        module.eval()
    pipe = family.pipeline(family.sampling_scheduler(), **live)
    pipe.set_progress_bar_config(disable=True)
    folder = Path(cfg.training.output_dir) / "validation" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    autocast = torch.autocast(accelerator.device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)
    size, steps = cfg.data.resolution, cfg.validation.validation_inference_steps
    for p, prompt in enumerate(cfg.validation.validation_prompt):
        generator = torch.Generator("cpu").manual_seed(cfg.training.seed)
        with autocast:
            if inputs:  # an edit model: the prompt applied to each input image
                length = family.options.get("max_sequence_length")  # as trained; None: the family's default
                out = [
                    pipe(prompt=prompt, num_inference_steps=steps, generator=generator,
                         **family.edit_inputs(pipe, references, size, size, length)).images[0]
                    for references in inputs
                ]  # fmt: skip
            else:
                out = pipe(
                    **family.prompt_inputs([prompt] * cfg.validation.num_validation_images),
                    num_inference_steps=steps, height=size, width=size, generator=generator,
                ).images  # fmt: skip
        for i, image in enumerate(out):
            image.save(folder / f"{p:02d}_{i:02d}.png")
        images.extend(out)
    grid = make_grid(images, cols=len(inputs) or cfg.validation.num_validation_images)
    grid.save(folder / "grid.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
    for name, module in live.items():
        module.train(was_training[name])
    return images
