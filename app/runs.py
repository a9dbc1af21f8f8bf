"""The runs in an output root, as the web app shows and drives them: one folder per run, read from what the trainer
writes, started and stopped as the command line would.

A run is `<output_root>/<name>/`: the trainer's output folder, holding the `config.yaml` the app wrote (every UI run
is `python -m difftune.finetune.finetune_lora --config <name>/config.yaml` on the command line), `train.log` (the
process's stdout and stderr), and what the trainer writes there itself: `progress.json` (step, length, loss, time
left), tensorboard events under `logs/`, `checkpoint-N/`, `best/best.json`, `validation/step-N/` images and the
result. Stop is SIGINT, the trainer's Ctrl+C: it ends with exit code 130 and keeps its last complete checkpoint
(checkpoints are complete-or-absent), from which resume (`--resume_from_checkpoint latest`) continues exactly.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from difftune.core import checkpoint as ckpt
from difftune.core.errors import UserError
from difftune.finetune.export import CARD_FILE
from difftune.finetune.loop import BEST, PROGRESS
from difftune.pipelines.loading import LORA_FILE

CONFIG = "config.yaml"
LOG = "train.log"
PID = "train.pid"  # the trainer's process id, so that an app started later still sees it train and can stop it
EXPORTS = "exports"  # <run>/exports/<checkpoint>/: a checkpoint's adapter saved as a result, for generation
TRAIN_MODULE = "difftune.finetune.finetune_lora"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
STOPPED = 130  # the exit code of a run stopped by SIGINT (`core.errors.run_main`)


def check_name(name: str, root: Path) -> Path:
    """The folder of a new run called `name`; a UserError naming the field when the name is not usable."""
    if not NAME.fullmatch(name):
        raise UserError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (up to 64), starting with a letter")
    folder = root / name
    if (folder / CONFIG).exists():
        raise UserError(f"--name {name}: a run of that name exists in {root}; choose another name")
    return folder


def train_command(run_dir: Path, resume: bool = False) -> list[str]:
    """The command that trains the run: the same on the command line as from the app."""
    command = [sys.executable, "-m", TRAIN_MODULE, "--config", str(run_dir / CONFIG)]
    return command + (["--resume_from_checkpoint", "latest"] if resume else [])


def shown_command(run_dir: Path, resume: bool = False) -> str:
    return " ".join(["python", *train_command(run_dir, resume)[1:]])


def write_config(run_dir: Path, text: str, preset: str | None) -> Path:
    """`config.yaml`: the settings' YAML, with a comment naming the preset folded into it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    header = f"# written by difftune-ui; preset {preset} folded in\n" if preset else "# written by difftune-ui\n"
    path = run_dir / CONFIG
    path.write_text(header + text)
    return path


class Runs:
    """The runs of one output root, and the training processes this app started."""

    def __init__(self, root: Path, env: dict[str, str] | None = None):
        self.root = Path(root)
        self.env = env
        self.processes: dict[str, subprocess.Popen] = {}

    def folder(self, name: str) -> Path:
        folder = self.root / name
        if not NAME.fullmatch(name) or not (folder / CONFIG).is_file():
            raise UserError(f"no run {name!r} in {self.root}")
        return folder

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / CONFIG).is_file())

    def start(self, name: str, resume: bool = False) -> None:
        folder = self.folder(name)
        if self.running(name):
            raise UserError(f"run {name} is already training")
        with open(folder / LOG, "a") as log:  # the child writes into its own copy of the file descriptor
            log.write(f"$ {shown_command(folder, resume)}\n")
            log.flush()
            process = subprocess.Popen(train_command(folder, resume), stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, env=self.env)  # fmt: skip
        self.processes[name] = process
        (folder / PID).write_text(str(process.pid))

    def stop(self, name: str) -> None:
        """SIGINT, as Ctrl+C: the trainer stops and its last complete checkpoint stays."""
        if name in self.processes and self.processes[name].poll() is None:
            self.processes[name].send_signal(signal.SIGINT)
        elif (pid := self.earlier_process(name)) is not None:
            os.kill(pid, signal.SIGINT)
        else:
            raise UserError(f"run {name} is not training")

    def running(self, name: str) -> bool:
        process = self.processes.get(name)
        if process is not None:
            return process.poll() is None
        return self.earlier_process(name) is not None

    def earlier_process(self, name: str) -> int | None:
        """The process id of the run's trainer when another instance of the app started it and it still runs
        (Linux: its command line in /proc names this run's config); None otherwise."""
        folder = self.root / name
        try:
            pid = int((folder / PID).read_text())
            command_line = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if str(folder / CONFIG).encode() in command_line.split(b"\0") else None

    def stop_all(self) -> None:
        for name in list(self.processes):
            if self.running(name):
                self.processes[name].send_signal(signal.SIGINT)
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()

    def status(self, name: str) -> str:
        """training | finished | stopped | failed | new."""
        folder = self.root / name
        if self.running(name):
            return "training"
        process = self.processes.get(name)
        if process is not None and process.returncode not in (0, STOPPED):
            return "failed"
        if (folder / CARD_FILE).is_file():  # written last by every LoRA save
            return "finished"
        if process is not None or ckpt.list_checkpoints(folder) or (folder / PROGRESS).is_file():
            return "stopped"
        return "failed" if error_line(folder) else "new"

    def summary(self, name: str, scalars: dict[str, list]) -> dict:
        """One row of the runs table."""
        folder = self.root / name
        progress = read_json(folder / PROGRESS) or {}
        status = self.status(name)
        losses, val = scalars.get("train/loss", []), scalars.get("validation/loss", [])
        best = read_json(folder / BEST / "best.json") or {}
        return {
            "name": name,
            "status": status,
            "step": progress.get("step", 0),
            "max_steps": progress.get("max_steps"),
            "loss": losses[-1][1] if losses else None,
            "validation_loss": val[-1][1] if val else None,
            "best_step": best.get("step"),
            "seconds_left": progress.get("seconds_left") if status == "training" else None,
            "error": error_line(folder) if status == "failed" else None,
            "weights": (["result"] if status == "finished" else [])
            + [c["name"] for c in checkpoints(folder, [])][::-1],
        }

    def lora(self, name: str, weights: str) -> Path:
        """What `--lora` loads for a run's `weights`: its result folder, or a checkpoint exported once (again when
        the checkpoint is newer, as `best/` becomes) under `<run>/exports/`."""
        from difftune.finetune.export import export_checkpoint

        folder = self.folder(name)
        if weights == "result":
            return folder
        if weights not in [c["name"] for c in checkpoints(folder, [])]:
            raise UserError(f"run {name} has no complete checkpoint {weights!r}")
        out = folder / EXPORTS / weights
        saved = (folder / weights / ckpt.MANIFEST).stat().st_mtime
        if not (out / LORA_FILE).is_file() or (out / LORA_FILE).stat().st_mtime < saved:
            export_checkpoint(folder / weights, out)
        return out


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def log_tail(folder: Path, lines: int = 30) -> list[str]:
    """The last lines of `train.log`, each progress-bar redraw (`\\r`) a line of its own, the latest kept."""
    try:
        with open(folder / LOG, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 64_000))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return []
    out = []
    for line in text.split("\n"):
        parts = [p for p in line.split("\r") if p.strip()]
        if parts:
            out.append(parts[-1])
    return out[-lines:]


def error_line(folder: Path) -> str | None:
    """The trainer's one-line `error: ...`, or the last line of a traceback, when its last run ended on one."""
    tail = log_tail(folder, 200)
    started = max((i for i, line in enumerate(tail) if line.startswith("$ ")), default=0)
    for line in reversed(tail[started:]):
        if line.startswith("error: ") or re.match(r"^\w+(Error|Exception)\b", line):
            return line
    return None


def validation_images(folder: Path) -> list[dict]:
    """The validation images per step, newest first: each step's grid and its image files (relative paths)."""
    steps = []
    for step_dir in (folder / "validation").glob("step-*"):
        step = step_dir.name.removeprefix("step-")
        if step.isdigit() and (step_dir / "grid.png").is_file():
            steps.append({"step": int(step), "grid": f"{name_of(step_dir, folder)}/grid.png"})
    return sorted(steps, key=lambda s: -s["step"])


def name_of(path: Path, folder: Path) -> str:
    return path.relative_to(folder).as_posix()


def checkpoints(folder: Path, validation: list) -> list[dict]:
    """The complete checkpoints, oldest first, each with the validation loss measured at its step (if any), and
    `best/` with its note."""
    at_step = dict(validation)
    rows = []
    for path in ckpt.list_checkpoints(folder):
        step = ckpt.step_of(path)
        rows.append({"name": path.name, "step": step, "validation_loss": at_step.get(step)})
    note = read_json(folder / BEST / "best.json")
    if note is not None and ckpt.damage(folder / BEST) is None:
        rows.append({"name": BEST, "step": note["step"], "validation_loss": note["validation_loss"]})
    return rows


def settings(folder: Path) -> dict:
    """The run's `config.yaml` settings."""
    try:
        return yaml.safe_load((folder / CONFIG).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


class Curves:
    """The training and validation losses of each run, read from its tensorboard logs with tensorboard's
    `EventAccumulator`: one reader per run, reloaded incrementally (a resumed run's new event file included; the
    steps it trains again replace the old ones)."""

    TAGS = ("train/loss", "validation/loss")

    def __init__(self):
        self.readers: dict[Path, object] = {}

    def read(self, folder: Path) -> dict[str, list[tuple[int, float]]]:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        logs = folder / settings(folder).get("logging_dir", "logs") / "difftune"  # the loop's tracker project name
        if not logs.is_dir():
            return {}
        if logs not in self.readers:
            self.readers[logs] = EventAccumulator(str(logs), size_guidance={"scalars": 0})
        reader = self.readers[logs]
        reader.Reload()
        tags = reader.Tags()["scalars"]
        return {tag: [(e.step, e.value) for e in reader.Scalars(tag)] for tag in self.TAGS if tag in tags}


def thinned(points: list, most: int = 400) -> list:
    """At most about `most` points of a curve, the last one kept."""
    if len(points) <= most:
        return points
    every = -(-len(points) // most)
    return points[::every] + ([points[-1]] if (len(points) - 1) % every else [])
