"""Every command in README.md runs (STYLE.md 10: the README is executable), reduced where the full run is long.

The commands are read from the README's ```bash blocks, so a command added there without a way to run it here
fails `test_every_readme_command_is_covered`. A console command (`difftune-train-lora ...`) runs in-process through
the `main(argv)` of the module its entry point names in the installed package's metadata; `accelerate launch
finetune/finetune_lora.py ...` and `accelerate launch -m difftune.finetune.finetune_lora ...` run the same `main` in
this one process once accelerate's own parser and checks have accepted the launch options (the launcher itself is
tested in tests/finetune/test_distributed.py).

Each command runs as written, with three kinds of change only: paths the README leaves to the user (`my_images/`,
`out/...`, a Hub id) become local test data; flags appended at the end (later flags win) shorten the run or move a
CUDA generation to this machine's CPU; and the demo's before/after evaluation is recorded instead of sampled
(tests/finetune/test_demo.py runs the demo in full against its bar). Where this machine cannot run a command (a
CUDA preset), the test asserts the one-line error the README promises instead. `make` lines are checked against the
Makefile and `pip install` lines against the installed package's metadata. The README's `my_run.yaml` is the file
the `--config my_run.yaml` commands read, and its Python API example runs too.

The ```bash blocks of docs/benchmarks.md (the commands that reproduce the embedded bases and the demo run too long)
run here the same way, reduced; its other benchmark commands are in plain fences and tested by their scripts' tests.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
from importlib.metadata import distribution, entry_points
from pathlib import Path

import pytest
import torch
import yaml

from difftune.core.config import with_settings
from difftune.core.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BENCHMARKS = (ROOT / "docs" / "benchmarks.md").read_text()


def readme_blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def bash_commands(text: str) -> list[str]:
    commands = []
    for block in readme_blocks("bash", text):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = re.split(r"\s+#\s", line)[0].strip()
            if line:
                commands.append(line)
    return commands


@dataclasses.dataclass
class Command:
    program: str  # "make demo", "pip install", a console command, a script path or a module (`-m`)
    argv: list[str]
    env: dict[str, str]
    launch: list[str] | None  # accelerate launch's own options, when the command goes through it

    @property
    def module(self) -> str:
        """The module whose `main(argv)` the command runs."""
        if self.program.endswith(".py"):  # a script of the checkout: finetune/finetune_lora.py
            return "difftune." + self.program.removesuffix(".py").replace("/", ".")
        return console_commands().get(self.program, self.program)


def parse_command(line: str) -> Command:
    tokens, env, launch = shlex.split(line), {}, None
    while re.match(r"^[A-Z_]+=", tokens[0]):
        key, value = tokens.pop(0).split("=", 1)
        env[key] = value
    if tokens[0] in ("make", "pip"):
        return Command(" ".join(tokens[:2]), tokens[2:], env, None)
    if tokens[:2] == ["accelerate", "launch"]:
        launch, tokens = [], tokens[2:]
        while tokens[0] != "-m" and not tokens[0].endswith(".py"):
            launch.append(tokens.pop(0))
    elif tokens[0] == "python":
        tokens = tokens[1:]
    if tokens[0] == "-m":
        return Command(tokens[1], tokens[2:], env, launch)
    return Command(tokens[0], tokens[1:], env, launch)


def console_commands() -> dict[str, str]:
    """Console command -> module, as the installed package declares them (pyproject's [project.scripts])."""
    return {ep.name: ep.module for ep in entry_points(group="console_scripts") if ep.module.startswith("difftune.")}


class Local:
    """How the README's placeholders map to local things: Hub ids to tiny pipelines built here, the user's folders
    to shapes-world data, `out/...` to a temporary folder, and paths of the checkout to the checkout."""

    HUB = {"stable-diffusion-v1-5/stable-diffusion-v1-5": "tiny_sd1", "black-forest-labs/FLUX.1-dev": "tiny_flux"}
    # what the tiny stand-in of a Hub model needs besides TRAIN_SHORT: its T5 tokenizer holds 16 tokens, not 512
    HUB_SHORT = {"black-forest-labs/FLUX.1-dev": ["--max_sequence_length", "16"]}

    def __init__(self, tmp: Path, request: pytest.FixtureRequest):
        self.tmp, self.request = tmp, request

    def __call__(self, arg: str) -> str:
        if arg in self.HUB:
            return str(self.request.getfixturevalue(self.HUB[arg]))
        if arg == "my_images/":
            return str(self.request.getfixturevalue("shapes_dir"))
        if arg == "my_dog/":  # a subject's photos without captions: --instance_prompt captions them
            return str(self.request.getfixturevalue("uncaptioned_dir"))
        if arg == "my_run.yaml":
            return str(self.run_yaml())
        if arg == "dogs/":  # the class images: absent, so generated by the base
            return str(self.tmp / "dogs")
        if arg.startswith(("out/", "outputs/", "runs/")):
            return str(self.tmp / arg)
        if not arg.startswith("-") and (ROOT / arg).exists():
            return str(ROOT / arg)
        return arg

    def run_yaml(self) -> Path:
        """The README's `my_run.yaml`, its values localised line by line (the YAML is otherwise as written)."""
        path = self.tmp / "my_run.yaml"
        if not path.exists():
            (block,) = readme_blocks("yaml")
            lines = [f"{key}: {self(value)}" for key, value in (line.split(": ", 1) for line in block.splitlines())]
            path.write_text("\n".join(lines) + "\n")
        return path


@pytest.fixture
def local(tmp_path, request) -> Local:
    return Local(tmp_path, request)


@pytest.fixture
def own_process():
    """Each README command runs in a process of its own, where accelerate fixes the mixed precision once: here the
    accelerator state starts fresh for each command and is left fresh for the next test."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def tiny_flux(tmp_path_factory):
    from difftune.toyworld.tiny import save_tiny_pipeline

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "flux", size="test", family="flux")


@pytest.fixture(scope="module")
def uncaptioned_dir(tmp_path_factory, shapes_dir):
    out = tmp_path_factory.mktemp("uncaptioned")
    for image in sorted(shapes_dir.glob("*.png"))[:4]:
        shutil.copy(image, out / image.name)
    return out


TRAIN_SHORT = ["--resolution", "32", "--max_train_steps", "2", "--checkpointing_steps", "2", "--validation_steps",
               "2", "--num_validation_images", "1", "--validation_inference_steps", "2", "--report_to", "none"]  # fmt: skip


def config_values(argv: list[str]) -> dict:
    """The keys of the `--config` files a command names (shipped presets by name too), later files winning."""
    from difftune.core.paths import shipped_config

    values = {}
    for i, arg in enumerate(argv[:-1]):
        if arg == "--config":
            path = Path(argv[i + 1]) if Path(argv[i + 1]).is_file() else shipped_config(argv[i + 1])
            values.update(yaml.safe_load(path.read_text()) or {})
    return values


def flag_value(argv: list[str], flag: str, default=None):
    """The value a command gives `flag` (the last one wins), else the one its --config files give."""
    for i in range(len(argv) - 2, -1, -1):
        if argv[i] == f"--{flag}":
            return argv[i + 1]
    return config_values(argv).get(flag, default)


def check_launch(cmd: Command) -> None:
    """accelerate's launcher must accept the options and find the program; the training then runs in-process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    target = ["-m", cmd.program] if not cmd.program.endswith(".py") else [str(ROOT / cmd.program)]
    if cmd.program.endswith(".py"):
        assert (ROOT / cmd.program).is_file(), cmd.program
    args = launch_command_parser().parse_args([*cmd.launch, *target, *cmd.argv])
    _validate_launch_command(args)


def run_training(cmd: Command, argv: list[str], main) -> None:
    if cmd.launch is not None:
        check_launch(cmd)
    if "--plan" in argv or "--fit" in argv:  # the memory planner: a plan is printed (tests/finetune/test_planner.py)
        main(argv)
        assert not Path(flag_value(argv, "output_dir")).exists(), "a plan trains nothing"
        return
    preset = config_values(argv)
    needs_cuda = preset.get("optimizer") == "adamw8bit" or preset.get("use_8bit_adam") or preset.get("quantize_base")
    if needs_cuda and not torch.cuda.is_available():  # an 8 GB preset on this CPU: the promised one-line error
        with pytest.raises(UserError, match="needs a CUDA GPU"):
            main(argv + TRAIN_SHORT)
        return
    if "--with_prior_preservation" in argv:
        argv = argv + ["--num_class_images", "2"]
    for hub_id, short in Local.HUB_SHORT.items():
        if hub_id in cmd.argv:
            argv = argv + short
    main(argv + TRAIN_SHORT)
    out = Path(flag_value(argv, "output_dir"))
    result = "model_index.json" if cmd.module.endswith("finetune_full") else "pytorch_lora_weights.safetensors"
    assert (out / result).is_file(), f"{cmd.program} wrote no {result} in {out}"
    if flag_value(argv, "keep_best_by"):
        assert (out / "best" / "best.json").is_file()
    if "--with_prior_preservation" in argv:
        assert len(list(Path(flag_value(argv, "class_data_dir")).glob("*.png"))) == 2  # generated by the base


def run_demo(argv: list[str], local: Local, monkeypatch, capsys) -> None:
    """`difftune-demo`: its own config, data and embedded base, 2 training steps; the before/after evaluation is
    recorded (which weights it scores) rather than sampled."""
    from difftune.core.paths import embedded_base
    from difftune.finetune import demo, loop
    from difftune.toyworld.shapes import Accuracy

    real_train, trained, scored = loop.train, [], []

    def short_train(cfg, task):
        cfg = with_settings(cfg, max_train_steps=2, checkpointing_steps=2, validation_prompt=None, report_to="none")
        trained.append(real_train(cfg, task))
        return trained[-1]

    def recorded_evaluate(model, lora_dir, seeds):
        scored.append((Path(model), lora_dir))
        purple = 1.0 if lora_dir else 0.0  # what a demo that meets its bar measures
        return {"purple": Accuracy(purple, 1.0, 3 * seeds), "base": Accuracy(1.0, 1.0, 12 * seeds)}

    monkeypatch.setattr(loop, "train", short_train)
    monkeypatch.setattr(demo, "evaluate", recorded_evaluate)
    work = local.tmp / "demo"
    demo.main(argv + ["--work_dir", str(work)])
    base = embedded_base(demo.DEMOS[flag_value(argv, "demo", "unet")][1])
    assert [t.global_step for t in trained] == [2]
    assert scored == [(base, None), (base, work / "out")]
    assert (work / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert "bar (" in capsys.readouterr().out


def run_generate(argv: list[str], local: Local) -> None:
    """The LoRA a command loads is the one the README's training command (or `make demo`) writes: trained here for
    one step on the command's model, at the path the command names."""
    from difftune.core.config import from_values
    from difftune.finetune.config import LoraTrainConfig
    from difftune.finetune.loop import train
    from difftune.finetune.tasks import LORA
    from difftune.pipelines import generate

    model, lora = flag_value(argv, "model"), Path(flag_value(argv, "lora"))
    train(from_values(LoraTrainConfig, {"pretrained_model_name_or_path": model, "output_dir": str(lora),
                                        "train_data_dir": local("my_images/"), "resolution": 32, "max_train_steps": 1,
                                        "report_to": "none"}), LORA)  # fmt: skip
    on_this_machine = [] if torch.cuda.is_available() else ["--device", "cpu", "--dtype", "fp32"]
    record = generate.main(argv + ["--steps", "2", "--num_images", "1"] + on_this_machine)
    assert record["family"] == "sd1" and len(record["images"]) == 1
    assert (Path(flag_value(argv, "output_dir")) / "record.json").is_file()


def run_baseline_train(argv: list[str], local: Local) -> None:
    from difftune.baselines.train import main

    main(argv + ["--max_train_steps", "2", "--resolution", "8", "--n_per_class", "2", "--set", "hidden=8",
                 "--set", "depth=1", "--set", "n_levels=1", "--sample_every", "2", "--checkpointing_steps", "2"])  # fmt: skip
    assert (Path(flag_value(argv, "output_dir")) / "checkpoint-2").is_dir()


def run_compare(argv: list[str], local: Local) -> None:
    from difftune.baselines.compare import main

    tiny = local.tmp / "tiny.yaml"
    tiny.write_text(yaml.safe_dump({
        "families": ["vae"], "seeds": [0], "resolution": 8, "n_per_class": 6, "budget_images": 64,
        "budget_seconds": None, "n_samples": 16, "n_samples_curve": 8, "quality_points": 1, "bpd_images": 8,
        "speed_batch": 8, "classifier_steps": 20, "model_overrides": {"vae": {"hidden": 8, "latent_channels": 2}},
    }))  # fmt: skip
    main(argv + ["--config", str(tiny)])
    assert json.loads((Path(flag_value(argv, "output_dir")) / "table.json").read_text())["runs"]


def run_demo_overtraining(argv: list[str], local: Local) -> None:
    """The long demo run, reduced to 4 steps scored at 1 seed; written under tmp, never over the repo's docs/."""
    from difftune.scripts.demo_overtraining import main

    out = local.tmp / "overtraining"
    argv = [str(out / "curve") if i and argv[i - 1] == "--output" else a for i, a in enumerate(argv)]
    record = main(argv + ["--max_train_steps", "4", "--validation_steps", "2", "--seeds", "1", "--work_dir", str(out)])
    assert [p["step"] for p in record["points"]] == [2, 4] and record["best"]["step"] in (2, 4)
    assert (out / "curve.png").stat().st_size > 0 and json.loads((out / "curve.json").read_text())["points"]


def run_train_tiny_vae(argv: list[str], local: Local) -> None:
    from difftune.scripts.train_tiny_vae import main

    main(argv + ["--steps", "2", "--size", "test", "--batch_size", "4"])
    assert (Path(flag_value(argv, "output_dir")) / "config.json").is_file()


def run_reproduce_base(argv: list[str], local: Local) -> None:
    from difftune.scripts.reproduce_tiny_shapes import main

    # --vae names the VAE the previous command trains; here the script trains a test-size one itself
    argv = [a for i, a in enumerate(argv) if a != "--vae" and (i == 0 or argv[i - 1] != "--vae")]
    family = flag_value(argv, "family", "sd1")
    main(argv + ["--no-install", "--size", "test", "--per_class", "1", "--vae_steps", "2", "--max_train_steps", "2",
                 "--seeds", "1"])  # fmt: skip
    work = Path(flag_value(argv, "work_dir"))
    index = json.loads((work / "base" / "model_index.json").read_text())
    assert index["_class_name"] == {"sd1": "StableDiffusionPipeline", "sd3": "StableDiffusion3Pipeline"}[family]
    if family == "sd3":  # the flow base's VAE carries the shift and scale that normalise its latents
        vae = json.loads((work / "base" / "vae" / "config.json").read_text())
        assert vae["shift_factor"] is not None and vae["scaling_factor"] > 0
    data = (work / "data" / "metadata.jsonl").read_text()
    assert "purple" not in data and data.count("\n") == 12


def check_make(cmd: Command) -> None:
    """`make demo` runs `difftune-demo` (the demo itself runs in tests/finetune/test_demo.py); `make test` is this
    suite."""
    makefile = (ROOT / "Makefile").read_text()
    recipe = re.search(rf"^{cmd.program.split()[1]}:.*\n\t(.*)$", makefile, re.M).group(1).rstrip()
    if cmd.program == "make demo":
        assert re.fullmatch(r"\$\(BIN\)/difftune-demo", recipe), recipe
    else:
        assert re.search(r"-m pytest -q( -n \S+ --dist worksteal)? tests$", recipe), recipe


def check_pip(cmd: Command) -> None:
    """`pip install .` installs this checkout's `difftune` with the console commands the README uses; the extra a
    `difftune[...]` line names exists and brings what the README says (`EXTRAS`)."""
    from packaging.requirements import Requirement

    dist = distribution("difftune")
    (target,) = cmd.argv
    if target == ".":
        version = re.search(r'^version = "(.*)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
        assert dist.version == version
        declared = {ep.name for ep in dist.entry_points if ep.group == "console_scripts"}
        used = {parse_command(c).program for c in COMMANDS if c.startswith("difftune-")}
        assert used <= declared, used - declared
        assert all(f"`{name}`" in README for name in declared), "the README names every console command"
        return
    wanted = Requirement(target)
    assert wanted.name == dist.metadata["Name"] and wanted.extras
    for extra in wanted.extras:
        assert extra in dist.metadata.get_all("Provides-Extra")
        brings = {Requirement(r).name for r in dist.requires if "extra ==" in r and Requirement(r).marker.evaluate({"extra": extra})}  # fmt: skip
        assert EXTRAS[extra] <= brings, brings


EXTRAS = {"bnb": {"bitsandbytes"}, "ui": {"fastapi", "uvicorn"}}  # what the README says each extra adds


def run_ui(argv: list[str], local: Local) -> None:
    """`difftune-ui` as a user starts it, in a process of its own (a server does not return): on a free port, until
    its page answers; then Ctrl+C (SIGINT) ends it cleanly."""
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [*argv, "--port", str(port)]
    server = subprocess.Popen([sys.executable, "-m", "difftune.app.ui", *argv], stdout=subprocess.PIPE, text=True)
    try:
        deadline, page = time.monotonic() + 120, b""
        while not page and time.monotonic() < deadline and server.poll() is None:
            try:
                page = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5).read()
            except OSError:
                time.sleep(0.5)
        assert b"<title>difftune</title>" in page
    finally:
        server.send_signal(signal.SIGINT)
        out, _ = server.communicate(timeout=60)
    assert server.returncode == 0 and f"open http://127.0.0.1:{port}/" in out
    assert Path(flag_value(argv, "output_root")).is_dir()


CHECKS = {"make demo": check_make, "make test": check_make, "pip install": check_pip}
RUNNERS = {
    "difftune.finetune.finetune_lora": "training",
    "difftune.finetune.finetune_full": "training",
    "difftune.finetune.demo": "demo",
    "difftune.pipelines.generate": "generate",
    "difftune.baselines.train": "baseline",
    "difftune.baselines.compare": "compare",
    "difftune.app.ui": "ui",
}
REPRODUCE_RUNNERS = {
    "difftune.scripts.train_tiny_vae": run_train_tiny_vae,
    "difftune.scripts.reproduce_tiny_shapes": run_reproduce_base,
    "difftune.scripts.demo_overtraining": run_demo_overtraining,
}
COMMANDS = bash_commands(README)
REPRODUCE = bash_commands(BENCHMARKS)


def test_every_readme_command_is_covered():
    for command in COMMANDS:
        cmd = parse_command(command)
        assert cmd.program in CHECKS or cmd.module in RUNNERS, f"no way to run this README command here: {command}"
    assert len(COMMANDS) >= 15
    for command in REPRODUCE:
        assert parse_command(command).module in REPRODUCE_RUNNERS, (
            f"no way to run this docs/benchmarks.md command: {command}"
        )
    assert len(REPRODUCE) == 4
    # every fenced block is one this file runs: bash commands, the one my_run.yaml, the one Python example
    languages = re.findall(r"^```(\w*)\n.*?^```", README, re.S | re.M)
    assert set(languages) <= {"bash", "yaml", "python", ""}, languages
    assert languages.count("yaml") == 1 and languages.count("python") == 1


@pytest.mark.parametrize("command", COMMANDS, ids=[f"{i}-{parse_command(c).program}" for i, c in enumerate(COMMANDS)])
def test_readme_command_runs(command, local, monkeypatch, capsys, own_process):
    import importlib

    cmd = parse_command(command)
    for key, value in cmd.env.items():
        monkeypatch.setenv(key, value)
    if cmd.program in CHECKS:
        CHECKS[cmd.program](cmd)
        return
    argv = [local(arg) for arg in cmd.argv]
    if cmd.launch is not None:
        cmd.launch = [local(arg) for arg in cmd.launch]
    kind = RUNNERS[cmd.module]
    if kind == "training":
        run_training(cmd, argv, importlib.import_module(cmd.module).main)
    elif kind == "demo":
        run_demo(argv, local, monkeypatch, capsys)
    elif kind == "generate":
        run_generate(argv, local)
    elif kind == "baseline":
        run_baseline_train(argv, local)
    elif kind == "ui":
        run_ui(argv, local)
    else:
        run_compare(argv, local)


def test_python_api_example_runs(local, monkeypatch, capsys, own_process):
    """The README's Python example, its placeholders localised and the run shortened as the commands' are."""
    import difftune

    train_lora, results = difftune.train_lora, []

    def local_train_lora(**values):
        values = {key: local(value) if isinstance(value, str) else value for key, value in values.items()}
        results.append(train_lora(**values | {"max_train_steps": 2, "resolution": 32, "report_to": "none"}))
        return results[-1]

    monkeypatch.setattr(difftune, "train_lora", local_train_lora)
    (example,) = readme_blocks("python")
    exec(compile(example, "README.md: Python API", "exec"), {})
    assert [r.global_step for r in results] == [2]
    assert capsys.readouterr().out.strip().splitlines()[-1] == "2"
    assert (local.tmp / "out" / "my-lora" / "pytorch_lora_weights.safetensors").is_file()


@pytest.mark.parametrize(
    "command", REPRODUCE, ids=[f"{i}-{parse_command(c).program}" for i, c in enumerate(REPRODUCE)]
)
def test_benchmarks_reproduce_command_runs(command, local, monkeypatch, own_process):
    cmd = parse_command(command)
    for key, value in cmd.env.items():
        monkeypatch.setenv(key, value)
    REPRODUCE_RUNNERS[cmd.module]([local(arg) for arg in cmd.argv], local)
