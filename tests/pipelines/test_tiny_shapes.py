"""The embedded base: shipped as a standard diffusers folder, small, and reproducible by its script."""

from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

ROOT = Path(__file__).resolve().parents[2]
BASE = ROOT / "pipelines" / "tiny_shapes"


def test_embedded_base_loads_small_and_knows_purple():
    size = sum(f.stat().st_size for f in BASE.rglob("*") if f.is_file())
    assert size <= 25 * 2**20
    assert not list(BASE.rglob("*.bin")) and not list(BASE.rglob("*.pt"))  # safetensors only
    pipe = StableDiffusionPipeline.from_pretrained(BASE, safety_checker=None)
    assert pipe.tokenizer.convert_ids_to_tokens(pipe.tokenizer("purple").input_ids[1:-1]) == ["purple</w>"]
    out = pipe("a red circle", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0)).images  # fmt: skip
    assert out.shape == (1, 64, 64, 3)


# scripts/reproduce_tiny_shapes.py runs end to end, for both bases, as the README's own commands in tests/test_readme.py.
