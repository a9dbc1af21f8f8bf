"""Exported LoRA files load back to the same images (diffusers and kohya keys, alpha != rank), for every family whose
pipeline class loads them (the 2026 families' diffusers files; the BFL layout ComfyUI wants for Flux.2 and Chroma);
the model card."""

import json

import numpy as np
import pytest
import torch
import yaml
from diffusers import ModelMixin, StableDiffusionPipeline
from peft import LoraConfig, inject_adapter_in_model
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from difftune.core.config import compose
from difftune.core.errors import UserError
from difftune.finetune.config import FullTrainConfig, LoraTrainConfig
from difftune.finetune.export import (
    KOHYA_FILE,
    LORA_FILE,
    SAMPLES_FILE,
    save_lora,
    save_lora_kohya,
    write_model_card,
)
from difftune.finetune.export_formats import export_format
from difftune.finetune.kohya_flux import flux_kohya_layers
from difftune.pipelines.families import FAMILIES, Flux, StableDiffusion1, StableDiffusionXL, by_name
from difftune.toyworld.tiny import build_pipeline
from difftune.toyworld.tiny_families import build_family_pipeline, sample_kwargs

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
FAKE_TOKEN = "hf_FAKEtokenDoNotLeak0123456789"


def attach_random_lora(model, targets, seed, r=4, alpha=8, **kw):
    """A LoRA with r != alpha (scale 2) and random weights, so that it changes the output and alpha matters."""
    config = LoraConfig(r=r, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=targets, **kw)
    if isinstance(model, ModelMixin):
        model.add_adapter(config)
    else:  # transformers' add_adapter wants peft >= 0.22; this is what it does
        inject_adapter_in_model(config, model, "default")
        model.peft_config = {"default": config}
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = torch.randn(param.shape, generator=gen) * 0.3


def images(pipe, **kw) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe("a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0), **kw).images  # fmt: skip


def load_sd1(path):
    return StableDiffusionPipeline.from_pretrained(path, safety_checker=None)


@pytest.fixture(scope="module")
def sd1_lora(tiny_sd1, tmp_path_factory):
    """The tiny SD1 pipeline with a random LoRA (r=4, alpha=8) on UNet and text encoder, saved both ways."""
    out = tmp_path_factory.mktemp("lora")
    pipe = load_sd1(tiny_sd1)
    attach_random_lora(pipe.unet, UNET_TARGETS, seed=1)
    attach_random_lora(pipe.text_encoder, TE_TARGETS, seed=2)
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder}
    save_lora(StableDiffusion1, models, out)
    save_lora_kohya(StableDiffusion1, models, out)
    return {"dir": out, "live": images(pipe)}


def test_kohya_keys_and_alpha(sd1_lora):
    kohya = load_file(sd1_lora["dir"] / KOHYA_FILE)
    modules = {k.split(".")[0] for k in kohya}
    assert {m.split("_")[1] for m in modules} == {"unet", "te"}  # SD1: lora_te_, not lora_te1_
    assert all(m.startswith(("lora_unet_", "lora_te_text_model_")) for m in modules)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0" in modules
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj" in modules
    for m in modules:
        assert set(k for k in kohya if k.startswith(m + ".")) == {f"{m}.lora_down.weight", f"{m}.lora_up.weight",
                                                                  f"{m}.alpha"}  # fmt: skip
        assert kohya[f"{m}.lora_down.weight"].shape[0] == 4
        assert kohya[f"{m}.alpha"].item() == 8.0  # scale alpha / rank = 2, as peft's lora_alpha / r


def test_diffusers_file_keeps_peft_config_so_alpha_loads(sd1_lora):
    with safe_open(sd1_lora["dir"] / LORA_FILE, "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
    assert meta["unet.lora_alpha"] == 8 and meta["unet.r"] == 4
    assert meta["text_encoder.lora_alpha"] == 8


def test_kohya_and_diffusers_files_give_the_same_images(tiny_sd1, sd1_lora):
    base = images(load_sd1(tiny_sd1))
    from_diffusers = load_sd1(tiny_sd1)
    from_diffusers.load_lora_weights(sd1_lora["dir"], weight_name=LORA_FILE)
    from_kohya = load_sd1(tiny_sd1)
    from_kohya.load_lora_weights(sd1_lora["dir"], weight_name=KOHYA_FILE)
    a, b = images(from_diffusers), images(from_kohya)
    assert np.abs(a - base).max() > 0.05  # the adapter matters
    np.testing.assert_allclose(a, sd1_lora["live"], atol=1e-5)  # saved == trained, alpha included
    np.testing.assert_allclose(b, a, atol=1e-5)


def test_kohya_export_without_alpha_fix_would_differ(tiny_sd1, sd1_lora, tmp_path):
    """Guards the alpha fix-up: a kohya file with alpha = rank (diffusers' default) loads a different LoRA."""
    kohya = load_file(sd1_lora["dir"] / KOHYA_FILE)
    save_file(
        {k: torch.tensor(4.0) if k.endswith(".alpha") else v for k, v in kohya.items()}, tmp_path / "x.safetensors"
    )
    pipe = load_sd1(tiny_sd1)
    pipe.load_lora_weights(tmp_path, weight_name="x.safetensors")
    assert np.abs(images(pipe) - sd1_lora["live"]).max() > 1e-3


# Every Flux double-block linear kohya's layout names (diffusers' converter back hard-codes Flux.1's single-block
# widths, so the tiny model's single blocks are checked by their weight deltas below instead).
FLUX_DOUBLE = (r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
               r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2)|norm1\.linear|norm1_context\.linear)")  # fmt: skip


def test_flux_kohya_file_loads_back_in_diffusers_to_the_same_images(tmp_path):
    pipe = build_pipeline("test", "flux", tokenizer_dir=tmp_path / "tok")
    attach_random_lora(pipe.transformer, FLUX_DOUBLE, seed=1, r=2, alpha=3)
    attach_random_lora(pipe.text_encoder, TE_TARGETS, seed=2, r=2, alpha=3)
    models = {"transformer": pipe.transformer, "text_encoder": pipe.text_encoder}
    save_lora_kohya(Flux, models, tmp_path)
    kohya = load_file(tmp_path / KOHYA_FILE)
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 6  # q, k, v fused: rank 3 x 2
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 6.0
    assert kohya["lora_unet_double_blocks_0_txt_mod_lin.alpha"].item() == 3.0
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in kohya
    assert len({k.split(".")[0] for k in kohya if k.startswith("lora_unet_")}) == 10 * len(
        pipe.transformer.transformer_blocks
    )
    live = images(pipe, max_sequence_length=16)
    base = build_pipeline("test", "flux", tokenizer_dir=tmp_path / "tok")
    base_images = images(base, max_sequence_length=16)
    base.load_lora_weights(tmp_path, weight_name=KOHYA_FILE)
    assert np.abs(live - base_images).max() > 0.05  # the adapter matters
    np.testing.assert_allclose(images(base, max_sequence_length=16), live, atol=1e-5)


@pytest.mark.parametrize("targets", [["to_q", "to_k", "to_v", "proj_mlp", "proj_out"], ["to_k", "proj_out"]])
def test_flux_fused_kohya_modules_carry_each_parts_weight_delta(tmp_path, targets):
    """BFL's fused linears (a single block's linear1 = q, k, v, mlp-in; a double block's qkv) hold exactly the
    deltas of the diffusers modules they fuse, zero for the parts without an adapter."""
    transformer = build_pipeline("test", "flux", tokenizer_dir=tmp_path / "tok").transformer
    attach_random_lora(transformer, targets, seed=3, r=2, alpha=5)
    kohya = flux_kohya_layers(transformer, "default")

    def delta(name):
        module = transformer.get_submodule(name)
        if not hasattr(module, "lora_A"):
            return torch.zeros_like(module.weight)
        return module.lora_B["default"].weight @ module.lora_A["default"].weight * module.scaling["default"]

    def fused(key):
        down, up, alpha = (kohya[f"{key}.{k}"] for k in ("lora_down.weight", "lora_up.weight", "alpha"))
        return up @ down * alpha / down.shape[0]

    for i in range(len(transformer.single_transformer_blocks)):
        parts = [f"single_transformer_blocks.{i}.{p}" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]
        torch.testing.assert_close(fused(f"lora_unet_single_blocks_{i}_linear1"), torch.cat([delta(p) for p in parts]))
        torch.testing.assert_close(fused(f"lora_unet_single_blocks_{i}_linear2"),
                                   delta(f"single_transformer_blocks.{i}.proj_out"))  # fmt: skip
    for i in range(len(transformer.transformer_blocks)):
        parts = [f"transformer_blocks.{i}.attn.{p}" for p in ("to_q", "to_k", "to_v")]
        torch.testing.assert_close(
            fused(f"lora_unet_double_blocks_{i}_img_attn_qkv"), torch.cat([delta(p) for p in parts])
        )


def test_flux_kohya_refuses_modules_it_has_no_key_for(tmp_path):
    transformer = build_pipeline("test", "flux", tokenizer_dir=tmp_path / "tok").transformer
    attach_random_lora(transformer, ["norm_out.linear", "to_q"], seed=4)  # BFL's final modulation swaps halves
    with pytest.raises(UserError, match=r"Flux kohya files have no key for \['norm_out.linear'\]"):
        flux_kohya_layers(transformer, "default")


def test_sdxl_kohya_prefixes_and_round_trip(tmp_path):
    pipe = build_pipeline("test", "sdxl", tokenizer_dir=tmp_path / "tok")
    attach_random_lora(pipe.unet, UNET_TARGETS, seed=1, r=2, alpha=3)
    attach_random_lora(pipe.text_encoder, TE_TARGETS, seed=2, r=2, alpha=3)
    attach_random_lora(pipe.text_encoder_2, TE_TARGETS, seed=3, r=2, alpha=3)
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    save_lora(StableDiffusionXL, models, tmp_path)
    save_lora_kohya(StableDiffusionXL, models, tmp_path)
    kohya = load_file(tmp_path / KOHYA_FILE)
    assert {k.split("_")[1] for k in kohya} == {"unet", "te1", "te2"}
    assert {v.item() for k, v in kohya.items() if k.endswith(".alpha")} == {3.0}
    live = images(pipe)
    base = build_pipeline("test", "sdxl", tokenizer_dir=tmp_path / "tok")
    base_images = images(base)
    base.load_lora_weights(tmp_path, weight_name=KOHYA_FILE)
    assert np.abs(live - base_images).max() > 0.05
    np.testing.assert_allclose(images(base), live, atol=1e-5)


def test_kohya_refuses_dora(tmp_path):
    pipe = build_pipeline("test", "sd1", tokenizer_dir=tmp_path / "tok")
    attach_random_lora(pipe.unet, UNET_TARGETS, seed=1, use_dora=True)
    with pytest.raises(UserError, match="plain LoRA only; this adapter is DoRA"):
        save_lora_kohya(StableDiffusion1, {"unet": pipe.unet}, tmp_path)


@pytest.mark.parametrize("family", FAMILIES, ids=lambda family: family.name)
def test_every_detected_family_has_export_formats(family):
    assert export_format(family).card_tags


def test_a_family_without_export_formats_is_named_in_the_error(tmp_path):
    class Other(StableDiffusion1):
        name = "other"

    with pytest.raises(LookupError, match="no export format for the 'other' family: add its entry to"):
        save_lora(Other, {}, tmp_path)


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_model_card(tmp_path):
    for step, colour in ((2, "red"), (10, "blue")):  # step 10 is the last, though "step-2" sorts after it
        (tmp_path / "validation" / f"step-{step}").mkdir(parents=True)
        Image.new("RGB", (8, 8), colour).save(tmp_path / "validation" / f"step-{step}" / "grid.png")
    cfg = compose(LoraTrainConfig, dict(pretrained_model_name_or_path="runwayml/stable-diffusion-v1-5", rank=4, lora_alpha=8,
                      validation_prompt=["a red circle", "a sks dog: on grass"], hub_token=FAKE_TOKEN))  # fmt: skip
    cfg.dreambooth.instance_prompt = "a photo of sks dog"
    text = write_model_card(tmp_path, cfg, "lora", StableDiffusion1).read_text()
    meta = front_matter(text)
    assert meta["base_model"] == "runwayml/stable-diffusion-v1-5" and meta["library_name"] == "diffusers"
    assert set(meta["tags"]) == {"stable-diffusion", "text-to-image", "diffusers", "lora", "difftune"}
    assert meta["instance_prompt"] == "a photo of sks dog"
    assert meta["widget"][0]["output"]["url"] == SAMPLES_FILE
    assert "- `a sks dog: on grass`" in text and "| lora_alpha | 8.0 |" in text and "| rank | 4 |" in text
    assert f"![samples]({SAMPLES_FILE})" in text
    assert Image.open(tmp_path / SAMPLES_FILE).getpixel((0, 0)) == (0, 0, 255)
    assert f'load_lora_weights("{tmp_path.name}")' in text
    assert FAKE_TOKEN not in text and "hub_token" not in text


def test_model_card_sdxl_full_without_samples(tmp_path):
    cfg = compose(
        FullTrainConfig, dict(pretrained_model_name_or_path="stabilityai/stable-diffusion-xl-base-1.0", use_ema=True)
    )
    text = write_model_card(tmp_path, cfg, "full", StableDiffusionXL).read_text()
    meta = front_matter(text)
    assert "stable-diffusion-xl" in meta["tags"] and "full" in meta["tags"] and "lora" not in meta["tags"]
    assert "instance_prompt" not in meta and "widget" not in meta
    assert "samples" not in text and not (tmp_path / SAMPLES_FILE).exists()
    assert "| use_ema | True |" in text and "rank" not in text


def test_model_card_inherits_the_base_models_licence(tmp_path):
    base = tmp_path / "flux-dev"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: other\nlicense_name: flux-1-dev-non-commercial-license\n"
                                    "license_link: LICENSE.md\ntags: [flux]\n---\n# FLUX.1 [dev]\n")  # fmt: skip
    cfg = compose(LoraTrainConfig, dict(pretrained_model_name_or_path=str(base)))
    (tmp_path / "out").mkdir()
    text = write_model_card(tmp_path / "out", cfg, "lora", Flux).read_text()
    meta = front_matter(text)
    assert (meta["license"], meta["license_name"], meta["license_link"]) == (
        "other", "flux-1-dev-non-commercial-license", "LICENSE.md")  # fmt: skip
    assert "Licence: the base model's, `flux-1-dev-non-commercial-license` (LICENSE.md)." in text
    assert "flux" in meta["tags"]
    (base / "README.md").unlink()  # no card: no licence claimed
    assert "license" not in front_matter(write_model_card(tmp_path / "out", cfg, "lora", Flux).read_text())


# Every linear BFL's layout names, per family (diffusers' Flux.1 converter back hard-codes Flux.1's single-block
# widths, so Chroma's single blocks are left out: their keys are Flux.1's, checked in test_export).
FAMILY_TARGETS = {
    "flux2": r"(transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
             r"|ff\.linear_(in|out)|ff_context\.linear_(in|out))"
             r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out))",
    "chroma": r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
              r"|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))",
}  # fmt: skip
FAMILY_TARGETS["flux2_klein"] = FAMILY_TARGETS["flux2"]
BFL_MODULES = {"flux2": (8, 2), "flux2_klein": (8, 2), "chroma": (8, 0)}  # BFL modules per (double, single) block


def family_images(pipe, family: str) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="a red circle", num_inference_steps=2, height=32, width=32, output_type="np",
                generator=torch.Generator().manual_seed(0), **sample_kwargs(family)).images  # fmt: skip


@pytest.mark.parametrize("family", ["flux2", "flux2_klein", "chroma"])
def test_kohya_file_loads_back_in_diffusers_to_the_same_images(tmp_path, family):
    pipe = build_family_pipeline(family)
    attach_random_lora(pipe.transformer, FAMILY_TARGETS[family], seed=1, r=2, alpha=3)
    save_lora_kohya(by_name(family), {"transformer": pipe.transformer}, tmp_path)
    kohya = load_file(tmp_path / KOHYA_FILE)
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 6  # q, k, v fused: 3 x 2
    assert kohya["lora_unet_double_blocks_0_img_attn_qkv.alpha"].item() == 6.0
    double, single = BFL_MODULES[family]
    modules = {k.split(".")[0] for k in kohya}
    assert len(modules) == double * len(pipe.transformer.transformer_blocks) + single * len(
        pipe.transformer.single_transformer_blocks
    )
    live = family_images(pipe, family)
    base = build_family_pipeline(family)
    base_images = family_images(base, family)
    base.load_lora_weights(tmp_path, weight_name=KOHYA_FILE)
    assert np.abs(live - base_images).max() > 1e-3  # the adapter matters
    np.testing.assert_allclose(family_images(base, family), live, atol=1e-5)


@pytest.mark.parametrize("family", ["qwen_image", "flux2", "flux2_klein", "z_image", "chroma"])
def test_diffusers_file_loads_in_the_pipeline_class_to_the_same_images(tmp_path, family):
    """The default targets (attention and feed-forward of both streams) in diffusers' file, with peft's config in
    its metadata (alpha != rank), load into the family's pipeline class and give the live model's images."""
    pipe = build_family_pipeline(family)
    fam = by_name(family)
    targets = fam.default_lora_targets(fam(str(tmp_path), {}, {"transformer": pipe.transformer}))
    attach_random_lora(pipe.transformer, targets, seed=2, r=2, alpha=3)
    save_lora(fam, {"transformer": pipe.transformer}, tmp_path)
    assert all(k.startswith("transformer.") for k in load_file(tmp_path / LORA_FILE))
    live = family_images(pipe, family)
    base = build_family_pipeline(family)
    base.load_lora_weights(tmp_path)
    np.testing.assert_allclose(family_images(base, family), live, atol=1e-5)
