"""Every command in README.md runs (STYLE.md 10: the README is executable), reduced where the full run is long.

The commands are read from the README's ```bash blocks, so a command added there without a way to run it here
fails `test_every_readme_command_is_covered`. Each is run as written, with three kinds of change only: paths the
README leaves to the user (`my_images/`, `out/...`, a Hub id, `<model>`) become local test data, flags appended at
the end shorten the run (later flags win), and `accelerate launch` becomes an in-process call (the launcher itself
is tested in tests/finetune/test_distributed.py). Where this machine cannot run a command (a CUDA preset), the test
asserts the one-line error the README promises instead.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from difftune.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.split(r"\s+#\s", line)[0].strip()
            if line:
                commands.append(line)
    return commands


def parse_command(command: str) -> tuple[str, list[str], dict]:
    """(program, argv, extras): `make X`, a script path or a `-m` module; extras hold env vars and the accelerate
    config file, if any."""
    tokens, extras = shlex.split(command), {}
    while re.match(r"^[A-Z_]+=", tokens[0]):
        key, value = tokens.pop(0).split("=", 1)
        extras[key] = value
    if tokens[0] == "make":
        return f"make {tokens[1]}", [], extras
    if tokens[:2] == ["accelerate", "launch"]:
        tokens = tokens[2:]
        if tokens[0] == "--config_file":
            extras["accelerate_config"], tokens = tokens[1], tokens[2:]
    elif tokens[0] == "python":
        tokens = tokens[1:]
    if tokens[0] == "-m":
        return tokens[1], tokens[2:], extras
    return tokens[0], tokens[1:], extras


@pytest.fixture
def local(tmp_path, tiny_sd1, shapes_dir):
    """How the README's placeholders map to local things, and a run config for `--config my_run.yaml`."""
    run = tmp_path / "my_run.yaml"
    run.write_text(yaml.safe_dump({"pretrained_model_name_or_path": str(tiny_sd1), "train_data_dir": str(shapes_dir),
                                   "output_dir": str(tmp_path / "run-out")}))  # fmt: skip
    return {"runwayml/stable-diffusion-v1-5": str(tiny_sd1), "<model>": str(tiny_sd1), "my_images/": str(shapes_dir),
            "my_run.yaml": str(run), "...": None, "tmp": tmp_path}  # fmt: skip


def localise(argv: list[str], local: dict) -> list[str]:
    out = []
    for arg in argv:
        if arg in local and local[arg] is not None:
            out.append(local[arg])
        elif arg.startswith(("out/", "outputs/", "runs/")):
            out.append(str(local["tmp"] / arg))
        elif arg != "...":
            out.append(arg)
    return out


TRAIN_SHORT = ["--resolution", "32", "--max_train_steps", "2", "--checkpointing_steps", "2", "--validation_steps",
               "2", "--num_validation_images", "1", "--validation_inference_steps", "2", "--report_to", "none"]  # fmt: skip


def run_demo_reduced(argv: list[str], local: dict) -> None:
    """`finetune_lora.py --demo NAME`: the demo's own config and data, 2 steps (test_demo.py runs demos in full)."""
    from difftune.core.config import from_values
    from difftune.finetune import demo
    from difftune.finetune.config import LoraTrainConfig
    from difftune.finetune.finetune_lora import demo_name
    from difftune.finetune.loop import train
    from difftune.finetune.tasks import LORA

    values = demo.demo_values(demo.demo_config(demo_name(argv)), local["tmp"])
    values.update(max_train_steps=2, checkpointing_steps=2, validation_prompt=None, report_to="none")
    assert train(from_values(LoraTrainConfig, values), LORA).global_step == 2


def run_finetune(program: str, argv: list[str], extras: dict, local: dict) -> None:
    if argv[:1] == ["--demo"]:
        run_demo_reduced(argv, local)
        return
    module = __import__(f"finetune.{Path(program).stem}", fromlist=["main"])
    if "accelerate_config" in extras:  # several GPUs/processes: accelerate must accept the file; one process runs here
        from accelerate.commands.launch import _validate_launch_command, launch_command_parser

        args = launch_command_parser().parse_args(["--config_file", extras["accelerate_config"], program])
        _validate_launch_command(args)
    if "--train_data_dir" not in argv and "--config" not in argv:  # `finetune_lora.py ...`: the README elides them
        argv = ["--config", local["my_run.yaml"], *argv]
    cuda_preset = any("configs/hardware/gpu-" in a for a in argv)
    if cuda_preset and not torch.cuda.is_available():
        with pytest.raises(UserError, match="needs a CUDA GPU"):
            module.main(argv + TRAIN_SHORT)
        return
    module.main(argv + TRAIN_SHORT)


def run_generate(argv: list[str], local: dict, embedded_lora: Path) -> None:
    from difftune.pipelines import generate

    argv = [str(embedded_lora) if a.endswith("demo-lora-purple") else a for a in argv]
    record = generate.main(argv + ["--steps", "2", "--num_images", "1"])
    assert record["family"] == "sd1" and len(record["images"]) == 1


def run_baselines(program: str, argv: list[str], local: dict) -> None:
    if program == "baselines.train":
        from difftune.baselines.train import main

        main(argv + ["--max_train_steps", "2", "--resolution", "8", "--n_per_class", "2", "--set", "hidden=8",
                     "--set", "depth=1", "--set", "n_levels=1", "--sample_every", "2", "--checkpointing_steps", "2"])  # fmt: skip
        return
    from difftune.baselines.compare import main

    tiny = local["tmp"] / "tiny.yaml"
    tiny.write_text(yaml.safe_dump({
        "families": ["vae"], "seeds": [0], "resolution": 8, "n_per_class": 6, "budget_images": 64,
        "budget_seconds": None, "n_samples": 16, "n_samples_curve": 8, "quality_points": 1, "bpd_images": 8,
        "speed_batch": 8, "classifier_steps": 20, "model_overrides": {"vae": {"hidden": 8, "latent_channels": 2}},
    }))  # fmt: skip
    main(argv + ["--config", str(tiny)])
    out = Path(argv[argv.index("--output_dir") + 1])
    assert json.loads((out / "table.json").read_text())["runs"]


def run_demo_overtraining(argv: list[str], local: dict) -> None:
    """The long demo run, reduced to 4 steps scored at 1 seed; written under tmp, never over the repo's docs/."""
    from difftune.scripts.demo_overtraining import main

    out = local["tmp"] / "overtraining"
    argv = [str(out / "curve") if i and argv[i - 1] == "--output" else a for i, a in enumerate(argv)]
    record = main(argv + ["--max_train_steps", "4", "--validation_steps", "2", "--seeds", "1", "--work_dir", str(out)])
    assert [p["step"] for p in record["points"]] == [2, 4] and record["best"]["step"] in (2, 4)
    assert (out / "curve.png").stat().st_size > 0 and json.loads((out / "curve.json").read_text())["points"]


def run_script(program: str, argv: list[str], local: dict) -> None:
    if program.endswith("demo_overtraining.py"):
        run_demo_overtraining(argv, local)
        return
    if program.endswith("train_tiny_vae.py"):
        from difftune.scripts.train_tiny_vae import main

        main(argv + ["--steps", "2", "--size", "test", "--batch_size", "4"])
        out = Path(argv[argv.index("--output_dir") + 1])
        assert (out / "config.json").exists()
        return
    from difftune.scripts.reproduce_tiny_shapes import main

    # the README's --vae names the VAE its previous command trains; here the script trains a test-size one
    argv = [a for i, a in enumerate(argv) if a != "--vae" and (i == 0 or argv[i - 1] != "--vae")]
    family = argv[argv.index("--family") + 1] if "--family" in argv else "sd1"
    if "--work_dir" not in argv:
        argv += ["--work_dir", str(local["tmp"] / "work")]
    main(argv + ["--no-install", "--size", "test", "--per_class", "1", "--vae_steps", "2", "--max_train_steps", "2",
                 "--seeds", "1"])  # fmt: skip
    work = Path(argv[argv.index("--work_dir") + 1])
    index = json.loads((work / "base" / "model_index.json").read_text())
    assert index["_class_name"] == {"sd1": "StableDiffusionPipeline", "sd3": "StableDiffusion3Pipeline"}[family]
    if family == "sd3":  # the flow base's VAE carries the shift and scale that normalise its latents
        vae = json.loads((work / "base" / "vae" / "config.json").read_text())
        assert vae["shift_factor"] is not None and vae["scaling_factor"] > 0
    data = (work / "data" / "metadata.jsonl").read_text()
    assert "purple" not in data and data.count("\n") == 12


def check_make(program: str) -> None:
    """`make demo` runs finetune_lora.py with no arguments (the demo itself runs in test_demo.py); `make test` is
    this suite."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(rf"^{program.split()[1]}:.*\n\t(.*)$", makefile, re.M).group(1)
    if program == "make demo":
        assert recipe.rstrip().endswith("finetune/finetune_lora.py"), recipe
    else:
        assert re.search(r"-m pytest -q( -n \S+ --dist worksteal)? tests$", recipe.rstrip()), recipe


@pytest.fixture(scope="module")
def embedded_lora(tmp_path_factory, shapes_dir):
    """A LoRA for the embedded base (the README's generate command loads the demo's)."""
    from difftune.core.config import from_values
    from difftune.finetune.config import EMBEDDED_BASE, LoraTrainConfig
    from difftune.finetune.loop import train
    from difftune.finetune.tasks import LORA

    out = tmp_path_factory.mktemp("embedded-lora")
    cfg = from_values(LoraTrainConfig, {"pretrained_model_name_or_path": EMBEDDED_BASE, "train_data_dir": str(shapes_dir),
                                        "output_dir": str(out), "resolution": 32, "max_train_steps": 1,
                                        "report_to": "none"})  # fmt: skip
    train(cfg, LORA)
    return out


COMMANDS = readme_commands()


def test_every_readme_command_is_covered():
    known = ("make demo", "make test", "finetune/finetune_lora.py", "finetune/finetune_full.py", "pipelines.generate",
             "baselines.train", "baselines.compare", "scripts/train_tiny_vae.py", "scripts/reproduce_tiny_shapes.py",
             "scripts/demo_overtraining.py")  # fmt: skip
    programs = {parse_command(c)[0] for c in COMMANDS}
    assert programs <= set(known), programs - set(known)
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{i}-{parse_command(c)[0]}" for i, c in enumerate(COMMANDS)])
def test_readme_command_runs(command, local, request):
    program, argv, extras = parse_command(command)
    argv = localise(argv, local)
    if program.startswith("make "):
        check_make(program)
    elif program.startswith("finetune/"):
        run_finetune(program, argv, extras, local)
    elif program == "pipelines.generate":
        run_generate(argv, local, request.getfixturevalue("embedded_lora"))
    elif program.startswith("baselines."):
        run_baselines(program, argv, local)
    else:
        run_script(program, argv, local)
