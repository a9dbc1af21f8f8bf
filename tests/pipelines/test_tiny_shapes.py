"""The embedded base: shipped as a standard diffusers folder, small, and reproducible by its script."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
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


@pytest.mark.parametrize("family", ["sd3"])  # sd1: the README's own command, run by tests/test_readme.py
def test_reproduce_script_runs_end_to_end_at_test_size(tmp_path, family):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "scripts/reproduce_tiny_shapes.py", "--family", family, "--work_dir", str(tmp_path),
           "--size", "test", "--per_class", "1", "--vae_steps", "2", "--max_train_steps", "2", "--seeds", "1",
           "--base_config", str(ROOT / "configs" / f"tiny_{'shapes' if family == 'sd1' else 'flow'}_base.yaml")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{family} denoiser: 2 steps" in proc.stdout and "colour accuracy" in proc.stdout
    index = json.loads((tmp_path / "base" / "model_index.json").read_text())
    assert index["_class_name"] == ("StableDiffusionPipeline" if family == "sd1" else "StableDiffusion3Pipeline")
    if family == "sd3":  # the VAE's latents are normalised by the shift and scale SD 3's VAE config carries
        vae = json.loads((tmp_path / "base" / "vae" / "config.json").read_text())
        assert vae["shift_factor"] is not None and vae["scaling_factor"] > 0
    data = (tmp_path / "data" / "metadata.jsonl").read_text()
    assert "purple" not in data and data.count("\n") == 12
