"""The embedded base: shipped as a standard diffusers folder, small, and reproducible by its script."""

import os
import subprocess
import sys
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


def test_reproduce_script_runs_end_to_end_at_test_size(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "scripts/reproduce_tiny_shapes.py", "--work_dir", str(tmp_path), "--size", "test",
           "--per_class", "1", "--vae_steps", "2", "--max_train_steps", "2", "--seeds", "1"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "UNet: 2 steps" in proc.stdout and "colour accuracy" in proc.stdout
    assert (tmp_path / "base" / "model_index.json").exists()
    data = (tmp_path / "data" / "metadata.jsonl").read_text()
    assert "purple" not in data and data.count("\n") == 12
