"""Start-up of the entry scripts: a run imports only what it uses and prints only what concerns it: no bitsandbytes
(an optional extra, imported only by the 8-bit options), no datasets for a folder of sidecar captions, no
tensorboard without --report_to tensorboard, and none of the third-party notices those imports print."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
ENV.pop("PYTHONWARNINGS", None)  # the notices must be absent, not filtered
NOISE = ("kernels", "torchvision", "Traceback")
# The entry script as `python finetune/finetune_lora.py ARGS` runs it, reporting at exit what `bitsandbytes` is.
PROBE = (
    "import atexit, runpy, sys; "
    "atexit.register(lambda: print('bitsandbytes in sys.modules:', type(sys.modules.get('bitsandbytes')).__name__)); "
    "sys.argv = ['finetune/finetune_lora.py', *sys.argv[1:]]; "
    "runpy.run_path('finetune/finetune_lora.py', run_name='__main__')"
)


def imported(stderr: str) -> set[str]:
    """Top-level packages named in `python -X importtime` lines."""
    return {
        line.rsplit("|", 1)[1].strip().split(".")[0] for line in stderr.splitlines() if line.startswith("import time:")
    }


def test_a_tiny_training_run_imports_and_prints_only_what_it_uses(tiny_sd1, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i in range(4):
        Image.fromarray(np.full((32, 32, 3), 60 * i, dtype=np.uint8)).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(f"a grey square {i}")
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", PROBE, "--pretrained_model_name_or_path",
         str(tiny_sd1), "--train_data_dir", str(data), "--output_dir", str(tmp_path / "out"), "--resolution", "32",
         "--train_batch_size", "2", "--max_train_steps", "2", "--report_to", "none"],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"diffusers", "peft", "accelerate"} <= imported(proc.stderr)  # the check sees the imports at all
    unused = {"datasets", "tensorboard", "tensorboardX"} & imported(proc.stderr)
    assert not unused, unused
    # -X importtime also lists the refused attempts, so bitsandbytes is checked where it would live
    assert "bitsandbytes in sys.modules: NoneType" in proc.stdout
    printed = proc.stdout + "\n".join(ln for ln in proc.stderr.splitlines() if not ln.startswith("import time:"))
    assert "trained 2 steps" in printed
    assert not [word for word in NOISE if word in printed], printed[-3000:]


def test_the_demo_entry_imports_quietly():
    """The import path of `make demo` (difftune-demo) up to its first model load."""
    code = (
        "import sys; from difftune.core.startup import quiet_start; quiet_start(); "
        "import difftune.finetune.demo, difftune.finetune.loop; "
        "import diffusers, transformers; diffusers.StableDiffusionPipeline; transformers.CLIPImageProcessor; "
        "print('bitsandbytes imported' if sys.modules.get('bitsandbytes') else 'ok')"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok"
    assert not [word for word in NOISE if word in proc.stdout + proc.stderr], proc.stderr[-3000:]


@pytest.mark.parametrize(
    "program", ["difftune.pipelines.generate", "difftune.baselines.compare", "difftune.baselines.train"]
)
def test_other_programs_start_quietly(program):
    """Generation and the baselines' programs: their imports, as `python -m PROGRAM` runs them, print nothing
    before their own output."""
    code = (
        "import atexit, runpy, sys; "
        "atexit.register(lambda: print('bitsandbytes in sys.modules:', type(sys.modules.get('bitsandbytes')).__name__)); "
        f"sys.argv = ['{program}', '--help']; runpy.run_module('{program}', run_name='__main__', alter_sys=True)"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "usage:" in proc.stdout and "bitsandbytes in sys.modules: NoneType" in proc.stdout
    assert not proc.stderr, proc.stderr[-3000:]
