import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from transformers import T5TokenizerFast

from difftune.toyworld.shapes import COLOURS, SHAPES
from difftune.toyworld.tiny import build_pipeline, save_tiny_pipeline
from difftune.toyworld.tiny_flow import write_t5_tokenizer
from difftune.toyworld.tiny_parts import MAX_LENGTH

PIPELINES = {"sd3": StableDiffusion3Pipeline, "sd35": StableDiffusion3Pipeline}
PIPELINES |= {"flux": FluxPipeline, "flux-schnell": FluxPipeline}
TRANSFORMERS = {StableDiffusion3Pipeline: "SD3Transformer2DModel", FluxPipeline: "FluxTransformer2DModel"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Each flow family saved once: {family: folder}."""
    root = tmp_path_factory.mktemp("tiny_flow")
    return {family: save_tiny_pipeline(root / family, size="test", family=family) for family in PIPELINES}


def generate(pipe, seed: int, **kwargs) -> np.ndarray:
    kwargs = dict(num_inference_steps=2, height=32, width=32, max_sequence_length=MAX_LENGTH) | kwargs
    return pipe("a red circle", generator=torch.Generator().manual_seed(seed), output_type="np", **kwargs).images


def test_t5_tokenizer_keeps_shapes_words_whole_and_tokenizes_anything(tmp_path):
    tok = T5TokenizerFast.from_pretrained(write_t5_tokenizer(tmp_path / "t5"))
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    for word in (*COLOURS, *SHAPES):
        ids = tok(word).input_ids
        assert len(ids) == 2 and ids[-1] == tok.eos_token_id, word  # one piece, then </s>
        assert tok.convert_ids_to_tokens(ids[0]) == "▁" + word
    ids = tok("a purple triangle").input_ids
    assert len(ids) == 4 and tok.decode(ids, skip_special_tokens=True) == "a purple triangle"
    spelled = tok("zqxv").input_ids  # unknown word: spelled out by characters, nothing lost
    assert len(spelled) == 6 and tok.unk_token_id not in spelled
    assert tok.decode(spelled, skip_special_tokens=True) == "zqxv"
    assert tok.unk_token_id in tok("naïve").input_ids  # outside the fallback characters: <unk>, not an error
    again = write_t5_tokenizer(tmp_path / "again")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tmp_path / "t5" / name).read_bytes()


@pytest.mark.parametrize("family", list(PIPELINES))
def test_saved_flow_pipeline_loads_with_diffusers_and_repeats_by_seed(saved, family):
    pipeline_class = PIPELINES[family]
    index = json.loads((saved[family] / "model_index.json").read_text())
    assert index["_class_name"] == pipeline_class.__name__
    assert index["transformer"] == ["diffusers", TRANSFORMERS[pipeline_class]]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    t5_name = "text_encoder_3" if pipeline_class is StableDiffusion3Pipeline else "text_encoder_2"
    assert index[t5_name] == ["transformers", "T5EncoderModel"]
    pipe = pipeline_class.from_pretrained(saved[family])
    assert sum(p.numel() for p in pipe.transformer.parameters()) < 100_000
    assert pipe.vae.config.shift_factor is not None
    a, b, c = generate(pipe, 0), generate(pipe, 0), generate(pipe, 1)
    assert a.shape == (1, 32, 32, 3) and np.isfinite(a).all()
    assert (a == b).all() and not (a == c).all()


def test_sd35_and_flux_variants_carry_their_distinguishing_configs(saved):
    sd35 = StableDiffusion3Pipeline.from_pretrained(saved["sd35"]).transformer.config
    assert tuple(sd35.dual_attention_layers) == (0,) and sd35.qk_norm == "rms_norm"
    dev = FluxPipeline.from_pretrained(saved["flux"])
    schnell = FluxPipeline.from_pretrained(saved["flux-schnell"])
    assert dev.transformer.config.guidance_embeds and not schnell.transformer.config.guidance_embeds
    assert dev.scheduler.config.use_dynamic_shifting and not schnell.scheduler.config.use_dynamic_shifting
    # Flux.1-dev takes the guidance scale as a transformer input; schnell has none to take.
    assert not (generate(dev, 0, guidance_scale=1.0) == generate(dev, 0, guidance_scale=5.0)).all()
    assert (generate(schnell, 0, guidance_scale=1.0) == generate(schnell, 0, guidance_scale=5.0)).all()


def test_sd3_without_t5_loads_and_runs(tmp_path):
    out = save_tiny_pipeline(tmp_path / "sd3_no_t5", family="sd3", t5=False)
    index = json.loads((out / "model_index.json").read_text())
    assert index["text_encoder_3"] == [None, None] and index["tokenizer_3"] == [None, None]
    # diffusers writes [null, null] but does not list text_encoder_3 as optional: loading names the absence again.
    with pytest.raises(ValueError, match="expected"):
        StableDiffusion3Pipeline.from_pretrained(out)
    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    assert pipe.text_encoder_3 is None
    a, b = generate(pipe, 0), generate(pipe, 0)
    assert a.shape == (1, 32, 32, 3) and (a == b).all()


def test_base_sd3_transformer_is_a_few_million_parameters():
    pipe = build_pipeline("base", "sd3")
    assert 1_000_000 < sum(p.numel() for p in pipe.transformer.parameters()) < 3_000_000
    assert generate(pipe, 0, height=64, width=64).shape == (1, 64, 64, 3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(family="flux", t5=False), "only for sd3 and sd35"),
        (dict(family="sd1", t5=False), "only for sd3 and sd35"),
        (dict(family="sd4"), "unknown family"),
        (dict(family="sd3", size="huge"), "unknown size"),
    ],
)
def test_bad_family_options_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_pipeline(**kwargs)
