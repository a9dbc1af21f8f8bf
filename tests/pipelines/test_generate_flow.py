"""`pipelines.generate` on the flow families: flow samplers, samplers that do not fit, LoRAs of another family."""

from __future__ import annotations

import json
import re

import pytest

from difftune.core.errors import UserError, run_main
from difftune.pipelines import generate
from difftune.pipelines.samplers import FLOW_SAMPLERS
from difftune.toyworld.tiny import save_tiny_pipeline


@pytest.fixture(scope="module")
def flow_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen-flow")
    return {f: save_tiny_pipeline(root / f, size="test", family=f) for f in ("sd3", "flux")} | {
        "sd3-no-t5": save_tiny_pipeline(root / "sd3-no-t5", size="test", family="sd3", t5=False)
    }


def args(model, out, *extra):
    return ["--model", str(model), "--prompt", "a red circle", "--steps", "2", "--height", "32", "--width", "32",
            "--output_dir", str(out), *extra]  # fmt: skip


@pytest.mark.parametrize("family", ["sd3", "flux", "sd3-no-t5"])
def test_flow_models_generate_with_flow_euler_by_default_and_repeat(flow_models, tmp_path, family):
    record = generate.main(args(flow_models[family], tmp_path / "a"))
    assert record["config"]["sampler"] == "flow-euler" and record["family"] == family.removesuffix("-no-t5")
    again = generate.main(["--from_record", str(tmp_path / "a" / "record.json"), "--output_dir", str(tmp_path / "b")])
    assert json.dumps(again["images"]) == json.dumps(record["images"])
    assert (tmp_path / "a" / "00000_seed0.png").read_bytes() == (tmp_path / "b" / "00000_seed0.png").read_bytes()


@pytest.mark.parametrize("sampler", sorted(FLOW_SAMPLERS))
def test_every_flow_sampler_runs_on_sd3(flow_models, tmp_path, sampler):
    assert generate.main(args(flow_models["sd3"], tmp_path, "--sampler", sampler))["config"]["sampler"] == sampler


@pytest.mark.parametrize(
    "family, sampler, message",
    [
        ("flux", "ddim", "sampler ddim is for DDPM .* models; flux models .FluxPipeline. sample with: flow-euler"),
        ("sd3", "dpmpp-2m", "sampler dpmpp-2m is for DDPM"),
        ("flux", "flow-heun", "FluxPipeline passes its own sigmas, which FlowMatchHeunDiscreteScheduler cannot take"),
    ],
)
def test_a_sampler_that_does_not_fit_is_one_line(flow_models, tmp_path, family, sampler, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_main(generate.main, args(flow_models[family], tmp_path, "--sampler", sampler))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert re.search(message, err), err


def test_flow_sampler_on_a_unet_model_is_one_line(tiny_sd1, tmp_path):
    with pytest.raises(UserError, match="sampler flow-euler is for flow-matching models; sd1 models"):
        generate.main(args(tiny_sd1, tmp_path, "--sampler", "flow-euler"))


def test_a_lora_of_another_family_names_both(flow_models, tiny_sd1, tmp_path):
    from safetensors.torch import save_file
    from torch import zeros

    flux_lora = tmp_path / "flux_lora.safetensors"
    save_file({"transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": zeros(2, 8)}, flux_lora)
    unet_lora = tmp_path / "unet_lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": zeros(2, 8)}, unet_lora)
    with pytest.raises(UserError, match=r"trained for a Flux.1/Chroma model; .* is sd1 \(StableDiffusionPipeline\)"):
        generate.main(args(tiny_sd1, tmp_path / "o", "--lora", str(flux_lora)))
    with pytest.raises(UserError, match=r"trained for an SD 1.x/2.x/SDXL model; .* is flux \(FluxPipeline\)"):
        generate.main(args(flow_models["flux"], tmp_path / "o", "--lora", str(unet_lora)))
    with pytest.raises(UserError, match=r"trained for a Flux.1/Chroma model; .* is sd3"):
        generate.main(args(flow_models["sd3"], tmp_path / "o", "--lora", str(flux_lora)))
