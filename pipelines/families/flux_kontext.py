"""Flux.1 Kontext: `FluxKontextPipeline`, Flux.1's transformer taught to edit an input image by an instruction
(Black Forest Labs, "FLUX.1 Kontext: Flow Matching for In-Context Image Generation and Editing in Latent Space",
2025).

The input (control) image is encoded by the VAE (its posterior's mode, shifted and scaled), packed 2x2 like the
noisy latents, and appended to them as more image tokens whose position ids carry index 1 instead of 0 (rows and
columns as the target's), exactly as the pipeline's `prepare_latents` builds them. The transformer's output for the
appended tokens is dropped, so the loss covers the target's tokens only. Everything else (text conditioning,
guidance, the rectified-flow objective) is Flux.1's.
"""

from __future__ import annotations

import inspect
from typing import ClassVar

import torch
from PIL import Image

from difftune.core.controls import control_size
from difftune.core.errors import UserError
from difftune.pipelines.families.flux import Flux, latent_ids, pack, unpack

T5_LIMIT = 512  # FluxKontextPipeline refuses longer T5 sequences


class FluxKontext(Flux):
    name: ClassVar[str] = "flux-kontext"
    pipeline_class_name: ClassVar[str] = "FluxKontextPipeline"
    max_controls: ClassVar[int] = 1  # the pipeline takes one input image
    control_multiple: ClassVar[int] = 16  # VAE x8 and 2x2 packing (the pipeline's `multiple_of`)

    def predict(self, denoiser, noisy, timesteps, cond, batch):
        _, _, h, w = noisy.shape
        tokens, ids = [pack(noisy)], [latent_ids(h // 2, w // 2, noisy)]
        for control in cond["control"]:  # (B, C, hc, wc) each
            tokens.append(pack(control.to(noisy.dtype)))
            ids.append(latent_ids(control.shape[-2] // 2, control.shape[-1] // 2, noisy, index=1))
        out = self.run_transformer(denoiser, torch.cat(tokens, dim=1), torch.cat(ids, dim=0), timesteps, cond)
        return unpack(out[:, : tokens[0].shape[1]], h, w)  # the target's tokens only

    @classmethod
    def edit_inputs(cls, pipe, images, height, width, max_sequence_length):
        """The input image sized as training sizes it (`control_size`: the result's area, its own aspect ratio), the
        result's area as `max_area` (the pipeline derives its size from that), and the pipeline's own resizing to
        its preferred 1-megapixel resolutions off, so a model trained at another size edits at it."""
        if len(images) != 1:
            raise UserError(f"{cls.pipeline_class_name} edits one input image at a time, got {len(images)}")
        image = images[0]
        size = control_size(image.size, (width, height), (width, height), cls.control_multiple)
        if max_sequence_length is None:
            max_sequence_length = min(T5_LIMIT, pipe.tokenizer_2.model_max_length)
        kwargs = {
            "image": image.resize(size, Image.Resampling.LANCZOS),
            "max_area": height * width,
            "max_sequence_length": max_sequence_length,
        }
        if "_auto_resize" in inspect.signature(pipe.__call__).parameters:
            kwargs["_auto_resize"] = False
        return {**kwargs, "height": height, "width": width}
