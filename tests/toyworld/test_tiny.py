import torch
from diffusers import StableDiffusionPipeline
from transformers import CLIPTokenizer

from difftune.toyworld.tiny import build_pipeline
from difftune.toyworld.tiny_parts import write_tokenizer


def test_tokenizer_has_whole_word_tokens_and_falls_back_to_bytes(tmp_path):
    tok = CLIPTokenizer.from_pretrained(write_tokenizer(tmp_path / "tok"))
    ids = tok("a purple triangle").input_ids
    assert len(ids) == 5  # <start> a purple triangle <end>: each word is one token
    assert tok.decode(ids[1:-1]) == "a purple triangle"
    assert len(tok("zqxv").input_ids) > 3  # unknown words still tokenize, by bytes
    assert (write_tokenizer(tmp_path / "again") / "vocab.json").read_text() == (
        tmp_path / "tok" / "vocab.json"
    ).read_text()


def test_tiny_pipeline_is_small_and_reloads_identically(tiny_sd1):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd1, safety_checker=None)
    assert sum(p.numel() for p in pipe.unet.parameters()) < 100_000
    kwargs = dict(num_inference_steps=2, height=64, width=64, output_type="np")
    a = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    b = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert a.shape == (1, 64, 64, 3) and (a == b).all()


def test_sizes_differ_by_seed():
    a = build_pipeline("test", seed=0).unet.conv_in.weight
    b = build_pipeline("test", seed=1).unet.conv_in.weight
    assert not torch.equal(a, b)
