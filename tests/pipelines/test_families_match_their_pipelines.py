"""Each 2026 family module computes what its diffusers pipeline computes, on tiny pipelines built with plain diffusers:
the text conditioning (`encode_prompt`), the latents (the family's image-to-image pipeline's `_encode_vae_image`),
one denoiser step (the pipeline's own sampling step from the same noise), and validation images from cached text
embeddings (the same images as from the prompts)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from difftune.finetune.data import collate
from difftune.pipelines.families import detect, read_model_index
from difftune.toyworld.tiny_families import FAMILIES, TEST_MAX_SEQUENCE_LENGTH, sample_kwargs, unpack_latents

CAPTIONS = ["a red circle", "a small blue square on the left of a large green triangle", ""]
SIZE = 32  # pixels


def load(folder):
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    family = detect(str(folder)).load(str(folder), read_model_index(str(folder)),
                                      options={"max_sequence_length": TEST_MAX_SEQUENCE_LENGTH})  # fmt: skip
    return pipe, family


# ----------------------------------------------------------------------------------------------- per family


def qwen_reference_text(pipe, captions) -> dict:
    embeds, mask = pipe.encode_prompt(captions, device="cpu", max_sequence_length=TEST_MAX_SEQUENCE_LENGTH)
    mask = torch.ones(embeds.shape[:2], dtype=torch.long) if mask is None else mask
    return {"encoder_hidden_states": embeds, "encoder_hidden_states_mask": mask}


def qwen_pack(pipe, latents):  # (B, C, h, w) -> the pipeline's 2x2-packed tokens (Qwen-Image's and Chroma's)
    return pipe._pack_latents(latents, *latents.shape)


def qwen_unpack(pipe, tokens):  # the pipeline's own unpacking (Qwen-Image's latents have a frame axis)
    latents = pipe._unpack_latents(tokens, SIZE, SIZE, pipe.vae_scale_factor)
    return latents[:, :, 0] if latents.ndim == 5 else latents


def qwen_encode_image(pipe, pixels):
    from diffusers import QwenImageImg2ImgPipeline

    return QwenImageImg2ImgPipeline.from_pipe(pipe)._encode_vae_image(pixels[:, :, None], generator=None)[:, :, 0]


def flux2_reference_text(pipe, captions) -> dict:
    embeds, _ = pipe.encode_prompt(captions, device="cpu", max_sequence_length=TEST_MAX_SEQUENCE_LENGTH)
    return {"encoder_hidden_states": embeds}


def flux2_unpack(pipe, tokens):  # (B, h * w, C) -> (B, C, h, w) of patchified latents
    side = SIZE // pipe.vae_scale_factor // 2
    return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, side, side)


def z_image_reference_text(pipe, captions) -> dict:
    embeds, _ = pipe.encode_prompt(list(captions), device="cpu", do_classifier_free_guidance=False,
                                   max_sequence_length=TEST_MAX_SEQUENCE_LENGTH)  # fmt: skip
    masks = [torch.ones(len(e), dtype=torch.long) for e in embeds]
    return {"cap_feats": torch.nn.utils.rnn.pad_sequence(embeds, batch_first=True),
            "cap_mask": torch.nn.utils.rnn.pad_sequence(masks, batch_first=True)}  # fmt: skip


def z_image_encode_image(pipe, pixels):  # ZImageImg2ImgPipeline.prepare_latents' encoding, the decode's inverse
    mode = pipe.vae.encode(pixels).latent_dist.mode()
    return (mode - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor


def chroma_reference_text(pipe, captions) -> dict:
    embeds, _, mask, *_ = pipe.encode_prompt(captions, device="cpu", do_classifier_free_guidance=False,
                                             max_sequence_length=TEST_MAX_SEQUENCE_LENGTH)  # fmt: skip
    return {"encoder_hidden_states": embeds, "attention_mask": mask}


def chroma_encode_image(pipe, pixels):
    from diffusers import ChromaImg2ImgPipeline

    return ChromaImg2ImgPipeline.from_pipe(pipe)._encode_vae_image(pixels, generator=None)


def same(pipe, latents):
    return latents


def flux2_encode_image(pipe, pixels):
    return pipe._encode_vae_image(pixels, generator=None)


FLUX2 = dict(text=flux2_reference_text, pack=same, unpack=flux2_unpack, encode_image=flux2_encode_image)
CASES = {
    "qwen_image": dict(text=qwen_reference_text, pack=qwen_pack, unpack=qwen_unpack, encode_image=qwen_encode_image),
    "flux2": FLUX2,
    "flux2_klein": FLUX2,
    "z_image": dict(text=z_image_reference_text, pack=same, unpack=same, encode_image=z_image_encode_image),
    "chroma": dict(text=chroma_reference_text, pack=qwen_pack, unpack=qwen_unpack, encode_image=chroma_encode_image),
}


# ----------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("family", FAMILIES)
def test_text_is_encoded_as_the_pipeline_encodes_it(family_model, family):
    """Captions of different lengths, the empty one included, tokenized one by one (as the dataset does) and batched
    by the trainer's collate, give the pipeline's `encode_prompt` output for the same batch."""
    pipe, fam = load(family_model(family))
    reference = CASES[family]["text"](pipe, CAPTIONS)
    ids = collate([{k: v[0] for k, v in fam.tokenize([c]).items()} for c in CAPTIONS])
    with torch.no_grad():
        ours = fam.encode_text(ids)
    assert ours.keys() == reference.keys()
    for key, value in reference.items():
        torch.testing.assert_close(ours[key].to(value.dtype), value, atol=1e-5, rtol=1e-5, msg=key)


@pytest.mark.parametrize("family", FAMILIES)
def test_latents_are_normalised_as_the_image_to_image_pipeline_encodes_images(family_model, family, monkeypatch):
    pipe, fam = load(family_model(family))
    pixels = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    with torch.no_grad():
        reference = CASES[family]["encode_image"](pipe, pixels)
        posterior = fam.posterior(pixels)
    mean = fam.normalize(posterior.chunk(2, dim=1)[0]) if fam.sample_posterior else fam.latents(posterior, None)
    torch.testing.assert_close(mean, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_one_denoiser_step_matches_the_pipelines_sampling_step(family_model, family):
    """The pipeline's first Euler step from some noise (x + (sigma_1 - sigma_0) v, its sigmas shifted as it shifts
    them) equals the step taken with the family's `predict` at sigma_0: packing, position ids, timestep convention,
    text mask and guidance input all agree."""
    pipe, fam = load(family_model(family))
    case = CASES[family]
    shape = fam.latents(fam.posterior(torch.zeros(1, 3, SIZE, SIZE)), torch.zeros(1, dtype=torch.long)).shape
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    seen = {}

    def first_step(pipeline, i, t, tensors):
        if i == 0:
            seen["latents"], seen["sigmas"] = tensors["latents"], pipeline.scheduler.sigmas.clone()
        return tensors

    with torch.no_grad():
        pipe(prompt=CAPTIONS[0], latents=case["pack"](pipe, noise), num_inference_steps=2, height=SIZE, width=SIZE,
             output_type="latent", callback_on_step_end=first_step, **sample_kwargs(family))  # fmt: skip
        sigma, after = seen["sigmas"][:2]
        cond = fam.encode_text(fam.tokenize(CAPTIONS[:1]))
        velocity = fam.predict(fam.denoiser, noise, 1000 * sigma.view(1), cond, {})
    torch.testing.assert_close(case["unpack"](pipe, seen["latents"]), noise + (after - sigma) * velocity,
                               atol=1e-4, rtol=1e-4)  # fmt: skip
    assert torch.equal(unpack_latents(family, seen["latents"], tuple(shape)), case["unpack"](pipe, seen["latents"]))


@pytest.mark.parametrize("family", FAMILIES)
def test_validation_images_from_cached_text_are_the_images_of_the_prompts(family_model, family):
    """Without its text encoders (freed after the text pass) a family samples from the cached embeddings, the
    empty caption's as the negative prompt of the pipeline's default guidance: the same images as the pipeline
    makes from the prompts."""
    pipe, fam = load(family_model(family))
    prompts = CAPTIONS[:2]
    kwargs = dict(num_inference_steps=2, height=SIZE, width=SIZE, output_type="np",
                  max_sequence_length=TEST_MAX_SEQUENCE_LENGTH)  # fmt: skip
    # a copy: ZImagePipeline writes its chat template into the prompt list it is given
    from_prompts = pipe(prompt=list(prompts), generator=torch.Generator().manual_seed(0), **kwargs).images
    with torch.no_grad():
        fam.text_embeddings = {c: {k: v[0] for k, v in fam.encode_text(fam.tokenize([c])).items()} for c in CAPTIONS}
    fam.parts["text_encoder"] = None
    inputs = fam.prompt_inputs(prompts)
    assert "prompt" not in inputs
    from_cache = pipe(**inputs, generator=torch.Generator().manual_seed(0), **kwargs).images
    np.testing.assert_allclose(from_cache, from_prompts, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_sigmas_take_the_shift_the_pipeline_samples_with(family_model, family, monkeypatch):
    """The resolution-dependent shift: the `mu` the pipeline hands its scheduler for a 32 px image, applied to
    training sigmas, is the family's `shift_sigmas` for that image's latents (unchanged where the scheduler's shift
    is static)."""
    pipe, fam = load(family_model(family))
    seen = {}
    set_timesteps = pipe.scheduler.set_timesteps

    @functools.wraps(set_timesteps)  # the pipeline reads its signature
    def record(*args, **kwargs):
        seen.update(kwargs)
        return set_timesteps(*args, **kwargs)

    def stop(pipeline, i, t, tensors):  # the schedule is all this test needs: skip the other 49 steps
        pipeline._interrupt = True
        return tensors

    monkeypatch.setattr(pipe.scheduler, "set_timesteps", record)
    pipe(prompt=CAPTIONS[0], num_inference_steps=50, height=SIZE, width=SIZE, output_type="latent",
         callback_on_step_end=stop, **sample_kwargs(family))  # fmt: skip
    sigmas = torch.tensor([0.9, 0.5, 0.1])
    shape = fam.latents(fam.posterior(torch.zeros(1, 3, SIZE, SIZE)), torch.zeros(1, dtype=torch.long)).shape
    dynamic = pipe.scheduler.config.get("use_dynamic_shifting", False)
    expected = pipe.scheduler.time_shift(seen["mu"], 1.0, sigmas) if dynamic else sigmas
    torch.testing.assert_close(fam.shift_sigmas(sigmas, tuple(shape)), expected)
    assert dynamic == (family != "z_image")  # Z-Image-Turbo's shift is static, already in the scheduler's sigmas
