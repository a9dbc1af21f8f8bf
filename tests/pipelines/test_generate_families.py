"""`pipelines.generate` on the 2026 families (tiny pipelines of `toyworld.tiny_families`): each generates with its
default sampler and every flow sampler that fits its pipeline; a sampler, a negative prompt or a LoRA that does not
fit is one line."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from difftune.core.errors import UserError, run_main
from difftune.pipelines import generate
from difftune.pipelines.families import by_name
from difftune.pipelines.samplers import fitting_samplers
from difftune.toyworld.tiny_families import FAMILIES

FITTING = {  # the flow samplers each pipeline can run (Flux2Pipeline lets a flow-sigma scheduler set its own)
    "qwen_image": ["flow-euler", "flow-unipc"],
    "flux2": ["flow-dpmpp-2m", "flow-euler", "flow-unipc"],
    "flux2_klein": ["flow-dpmpp-2m", "flow-euler", "flow-unipc"],
    "z_image": ["flow-euler"],  # ZImagePipeline hands UniPC a list of sigmas it cannot shift
    "chroma": ["flow-euler", "flow-unipc"],
}


def args(model, out, *extra):
    return ["--model", str(model), "--prompt", "a red circle", "--steps", "2", "--height", "32", "--width", "32",
            "--output_dir", str(out), *extra]  # fmt: skip


@pytest.mark.parametrize("family", FAMILIES)
def test_each_family_generates_with_every_flow_sampler_that_fits(family_model, tmp_path, family):
    assert sorted(fitting_samplers(by_name(family))) == FITTING[family]
    default = generate.main(args(family_model(family), tmp_path / "default", "--guidance_scale", "2"))
    assert default["family"] == family and default["config"]["sampler"] == "flow-euler"
    assert (tmp_path / "default" / "00000_seed0.png").is_file()
    for sampler in (s for s in FITTING[family] if s != "flow-euler"):
        record = generate.main(args(family_model(family), tmp_path / sampler, "--sampler", sampler))
        assert record["config"]["sampler"] == sampler


@pytest.mark.parametrize(
    "family, extra, message",
    [
        (
            "qwen_image",
            ["--sampler", "dpmpp-2m"],
            "sampler dpmpp-2m is for DDPM .* qwen_image models .QwenImagePipeline",
        ),
        ("z_image", ["--sampler", "flow-heun"], "ZImagePipeline passes its own sigmas, which FlowMatchHeun"),
        ("flux2", ["--sampler", "flow-heun"], "Flux2Pipeline passes its own sigmas"),
        ("flux2_klein", ["--negative_prompt", "blurry"], "--negative_prompt: Flux2KleinPipeline takes no negative"),
        (
            "z_image",
            ["--sampler", "flow-unipc"],
            "sampler flow-unipc does not run with ZImagePipeline: .*; use one of",
        ),
    ],
)
def test_what_does_not_fit_is_one_line(family_model, tmp_path, family, extra, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(generate.main, args(family_model(family), tmp_path, *extra))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert re.search(message, err), err


@pytest.mark.parametrize(
    "key, family, description",
    [
        ("transformer.transformer_blocks.0.img_mlp.net.0.proj.lora_A.weight", "flux2", "a Qwen-Image model"),
        ("transformer.single_transformer_blocks.0.attn.to_qkv_mlp_proj.lora_A.weight", "chroma", "a Flux.2 model"),
        ("transformer.layers.0.attention.to_q.lora_A.weight", "qwen_image", "a Z-Image model"),
        ("transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight", "z_image", "a Flux.1/Chroma model"),
        ("lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", "qwen_image", "a Flux model .Black Forest"),
    ],
)
def test_a_lora_of_another_family_names_both(family_model, tmp_path, key, family, description):
    lora = tmp_path / "lora.safetensors"
    save_file({key: torch.zeros(2, 8)}, lora)
    pipeline = by_name(family).pipeline_class_name
    with pytest.raises(UserError, match=rf"trained for {description}.*; .* is {family} \({pipeline}\)"):
        generate.main(args(family_model(family), tmp_path / "out", "--lora", str(lora)))
