"""Qwen-Image-Edit: `QwenImageEditPipeline`, Qwen-Image's MMDiT taught to edit an input image by an instruction, and
Qwen-Image-Edit-Plus (`QwenImageEditPlusPipeline`, the 2509 release), which takes several input images (Wu et al.
2025, "Qwen-Image Technical Report").

As the pipelines' `__call__` builds the inputs, for each input (control) image:
- it is resized, aspect ratio kept (up to rounding), to about a megapixel with sides a multiple of 32 (`calculate_dimensions(1024 *
  1024, w / h)`), encoded by the 3D VAE as a one-frame video (the posterior's mode, normalised per channel by
  `latents_mean` / `latents_std`), packed 2x2 like the noisy latents and appended to them as more image tokens;
  `img_shapes` lists the target's grid, then each input's. The transformer's output for the appended tokens is
  dropped, so the loss covers the target's tokens only.
- it is also read by the Qwen2.5-VL text encoder beside the instruction: the pipeline's edit template holds the
  image's vision tokens (Plus: "Picture N: ..." for each image, each resized to about 384x384 for this), the
  processor (`Qwen2VLProcessor`) expands them to one token per merged patch and gives the patches, and the last
  hidden layer at the valid tokens, minus the template's first 64, is the text stream. The pipeline does not
  truncate it (`--max_sequence_length` does not apply).
The timestep (t / 1000), the resolution-dependent sigma shift (from the target's token count only) and the
rectified-flow objective are Qwen-Image's. An input image whose aspect ratio the 32-pixel multiples cannot keep
exactly is stretched to them, as the pipeline resizes it, never cropped (`stretch_controls`).

The text embedding depends on the input image as well as the instruction, so it is cached per instruction and input
image(s) (flipped too under `--random_flip`), by the data's cache while the text encoder is loaded beside the rest
(not in a pass of its own before the transformer loads, as Qwen-Image's: validation edits encode their prompts with
the input images through the pipeline); with caching off the encoder reads each batch's pairs.
"""

from __future__ import annotations

from functools import cache
from typing import ClassVar

import torch
from einops import rearrange
from PIL import Image

from difftune.core.errors import UserError
from difftune.pipelines.families.base import component_class, load_part, pad_sequences
from difftune.pipelines.families.qwen_image import QwenImage

# QwenImageEditPlusPipeline introduces each input image so ("Picture 1: ...Picture 2: ...", then the instruction).
PICTURE = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"


@cache
def edit_template(pipeline_class_name: str) -> tuple[str, int]:
    """The edit pipeline's prompt template and how many of its leading tokens it drops, read from the class."""
    import diffusers

    cls = getattr(diffusers, pipeline_class_name)
    pipe = cls(scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None, transformer=None)
    return pipe.prompt_template_encode, pipe.prompt_template_encode_start_idx


def calculate_dimensions(area: int, ratio: float) -> tuple[int, int]:
    """(w, h) of about `area` pixels at aspect ratio `ratio`, sides multiples of 32: the edit pipelines' rule."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions as rule

    return rule(area, ratio)


class QwenImageEdit(QwenImage):
    name: ClassVar[str] = "qwen-image-edit"
    pipeline_class_name: ClassVar[str] = "QwenImageEditPipeline"
    max_controls: ClassVar[int] = 1  # the pipeline takes one input image
    control_multiple: ClassVar[int] = 32  # `calculate_dimensions`
    text_reads_controls: ClassVar[bool] = True
    stretch_controls: ClassVar[bool] = True  # `VaeImageProcessor.resize` to the calculated size: no crop
    text_first: ClassVar[bool] = False  # cached with the pairs (`finetune.data.cache_pair_text`)
    lora_families: ClassVar[tuple[str, ...]] = ("qwen_image",)  # Qwen-Image's transformer: its LoRAs load here too
    vae_area: ClassVar[int] = 1024 * 1024  # the area input images are encoded at (`__call__`'s `calculate_dimensions`)
    text_area: ClassVar[int] = 1024 * 1024  # ... and read by the text encoder at (the same resized image)

    @classmethod
    def matches(cls, index: dict, model: str) -> bool:
        return index.get("_class_name") == cls.pipeline_class_name

    @classmethod
    def load(cls, model, index, denoiser=None, options=None, text_encoders=True, make_part=None):
        family = super().load(model, index, denoiser, options, text_encoders, make_part)
        family.parts["processor"] = cls.load_processor(model, index)
        return family

    @classmethod
    def load_text(cls, model, index, options=None, dtype=None):
        family = super().load_text(model, index, options, dtype)
        family.parts["processor"] = cls.load_processor(model, index)
        return family

    @classmethod
    def load_processor(cls, model: str, index: dict):
        """The pipeline's `Qwen2VLProcessor`, built from its folder's files without torchvision
        (`core.processors`)."""
        from difftune.core.processors import load_qwen_vl_processor

        component_class(index, "processor", model)  # a processor from diffusers/transformers only
        tokenizer_class = component_class(index, "tokenizer", model)
        return load_part(model, "processor", lambda: load_qwen_vl_processor(model, "processor", tokenizer_class))

    @classmethod
    def from_pretrained_kwargs(cls, index: dict, model: str) -> dict:
        return {"processor": cls.load_processor(model, index)}

    @classmethod
    def check_settings(cls, model: str, index: dict, options: dict) -> None:
        if options.get("max_sequence_length") is not None:
            raise UserError(
                f"--max_sequence_length does not apply to {cls.pipeline_class_name}: it encodes each instruction whole, "
                "with its input image's tokens; drop the flag"
            )

    @classmethod
    def control_size(
        cls, size: tuple[int, int], image_size: tuple[int, int], bucket: tuple[int, int]
    ) -> tuple[int, int]:
        """The pipeline's: about `vae_area` pixels at the input's own aspect ratio, whatever the result's size."""
        return calculate_dimensions(cls.vae_area, size[0] / size[1])

    @classmethod
    def edit_inputs(cls, pipe, images, height, width, max_sequence_length):
        if len(images) > cls.max_controls:
            raise UserError(f"{cls.pipeline_class_name} edits {cls.max_controls} input image(s), got {len(images)}")
        return {"image": images[0] if cls.max_controls == 1 else list(images), "height": height, "width": width}

    # --- text ------------------------------------------------------------------------------------------

    def prompt_text(self, caption: str, count: int) -> str:
        return edit_template(self.pipeline_class_name)[0].format(caption)

    def text_images(self, images: list[Image.Image]) -> list[Image.Image]:
        """The input images as the pipeline hands them to the processor: resized to about `text_area` pixels, aspect
        ratio kept (`VaeImageProcessor.resize`: Lanczos)."""
        area = self.text_area
        return [im.resize(calculate_dimensions(area, im.width / im.height), Image.Resampling.LANCZOS) for im in images]

    def tokenize(self, captions: list[str], controls: list[list[Image.Image]] | None = None) -> dict:
        """Each caption in the edit template with its input images (`controls`, one list per caption, flipped as
        the training pair is): token ids and mask (B, L), right-padded; the processor's patches (B, N, D) and their
        grids (B, K, 3) for the K images of each caption."""
        if controls is None or len(controls) != len(captions):
            raise ValueError(f"{self.name} encodes each instruction with its input images: give one list per caption")
        processor, rows = self.parts["processor"], []
        for caption, images in zip(captions, controls, strict=True):
            out = processor(text=[self.prompt_text(caption, len(images))], images=self.text_images(images),
                            padding=True, return_tensors="pt")  # fmt: skip
            rows.append({k: out[k][0] if k in ("input_ids", "attention_mask") else out[k] for k in
                         ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")})  # fmt: skip
        return {key: pad_sequences([row[key] for row in rows]) for key in rows[0]}

    def encode_text(self, ids, encoders=None) -> dict:
        encoder = (encoders or self.text_encoders())["text_encoder"]
        device = next(encoder.parameters()).device
        mask = ids["attention_mask"].to(device)
        grids = ids["image_grid_thw"]  # (B, K, 3): each image's (t, h, w) patches
        counts = grids.prod(dim=-1).sum(dim=-1).tolist()  # patches of each caption's images
        patches = torch.cat([p[:n] for p, n in zip(ids["pixel_values"], counts, strict=True)])  # (sum N, D)
        hidden = encoder(
            input_ids=ids["input_ids"].to(device), attention_mask=mask, pixel_values=patches.to(device),
            image_grid_thw=grids.reshape(-1, 3).to(device), output_hidden_states=True,
        ).hidden_states[-1]  # (B, L, D)  # fmt: skip
        drop = edit_template(self.pipeline_class_name)[1]
        valid = [h[m.bool()][drop:] for h, m in zip(hidden, mask, strict=True)]  # the pipeline keeps them all
        masks = [torch.ones(len(v), dtype=torch.long, device=device) for v in valid]
        return {"encoder_hidden_states": pad_sequences(valid), "encoder_hidden_states_mask": pad_sequences(masks)}

    def text_cache_tag(self) -> str:
        return f"{self.name}-template"

    # --- the denoiser -----------------------------------------------------------------------------------

    def predict(self, denoiser, noisy, timesteps, cond, batch):
        b, c, h, w = noisy.shape
        tokens, shapes = [self.pack(noisy)], [(1, h // 2, w // 2)]
        for control in cond["control"]:  # (B, C, hc, wc) each, in reference order
            tokens.append(self.pack(control.to(noisy.dtype)))
            shapes.append((1, control.shape[-2] // 2, control.shape[-1] // 2))
        mask = cond["encoder_hidden_states_mask"].to(noisy.device)
        out = denoiser(
            hidden_states=torch.cat(tokens, dim=1), timestep=timesteps.to(noisy.dtype) / 1000,
            encoder_hidden_states=cond["encoder_hidden_states"].to(noisy.dtype),
            encoder_hidden_states_mask=None if bool(mask.all()) else mask, img_shapes=[shapes] * b, return_dict=False,
        )[0][:, : tokens[0].shape[1]]  # the target's tokens only  # fmt: skip
        return rearrange(out, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h // 2, w=w // 2, ph=2, pw=2)

    @staticmethod
    def pack(latents: torch.Tensor) -> torch.Tensor:
        """(B, C, h, w) latents as (B, h/2 * w/2, 4C) tokens of 2x2 patches (`_pack_latents`)."""
        return rearrange(latents, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)


class QwenImageEditPlus(QwenImageEdit):
    """Several input images (the pipeline's list), each its own tokens and "Picture N:" in the instruction; the
    text encoder reads each at about 384x384 (`CONDITION_IMAGE_SIZE`), the VAE at about a megapixel."""

    name: ClassVar[str] = "qwen-image-edit-plus"
    pipeline_class_name: ClassVar[str] = "QwenImageEditPlusPipeline"
    max_controls: ClassVar[int] = 3  # the pipeline takes any number; the release is trained and shown with 1-3
    text_area: ClassVar[int] = 384 * 384  # the pipeline module's CONDITION_IMAGE_SIZE (VAE_IMAGE_SIZE: `vae_area`)

    def prompt_text(self, caption: str, count: int) -> str:
        pictures = "".join(PICTURE.format(i + 1) for i in range(count))
        return edit_template(self.pipeline_class_name)[0].format(pictures + caption)
