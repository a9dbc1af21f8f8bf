"""A hostile but realistic user against every difftune command: a few hundred cases, each classified.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python -m difftune.scripts.hostile_run --work /tmp/hostile [--only RE]

Each case (`scripts/hostile_cases*.py`) names a command, its arguments, the outcome a user should get (OK: exit 0;
CLEAN: exit 2 with one `error:` line naming the flag/file/value) and, where it matters, a check of what is on disk
afterwards. A case runs as the console command runs (`cli()`, which reads `sys.argv`) in a process forked from this
one after the imports, so each costs its work and not the 10-20 s of importing torch and diffusers; signals (SIGKILL,
SIGINT, SIGTERM) go to that process when a line of its log appears. Results:

- OK / CLEAN: the promised outcome;
- TRACEBACK: a Python traceback on stderr;
- LOSS: exit 0 where a refusal was owed, a refusal of a valid command, or a check of the files that failed (work
  lost, the wrong thing trained, a silent wrong behaviour);
- HANG: no exit within the case's time limit.

The run writes `results.jsonl` (one line a case) and a summary per command under `--work`; it is not part of the
test suite (minutes of training).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import shutil
import signal
import sys
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

COMMANDS = {
    "lora": ("difftune-train-lora", "difftune.finetune.finetune_lora"),
    "full": ("difftune-train-full", "difftune.finetune.finetune_full"),
    "generate": ("difftune-generate", "difftune.pipelines.generate"),
    "compare": ("difftune-compare", "difftune.baselines.compare"),
    "baseline": ("difftune-train-baseline", "difftune.baselines.train"),
    "demo": ("difftune-demo", "difftune.finetune.demo"),
}
TRACEBACK = "Traceback (most recent call last)"


@dataclass
class Result:
    """One command's exit: its code (negative: killed by that signal), its output, and whether it was killed."""

    rc: int
    out: str
    err: str
    seconds: float
    hung: bool = False
    killed: bool = False

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.err.splitlines() if line.startswith("error:") or ": error: " in line]


class Loss(Exception):
    """A check found lost work or a silent wrong behaviour."""


@dataclass
class Ctx:
    """What a case works with: the shared pipelines and data, its own folder, and a way to run a command."""

    world: Path
    tmp: Path
    log: list[str] = field(default_factory=list)
    results: list[Result] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the results file should say beside the class

    def p(self, name: str) -> Path:
        return self.world / "p" / name

    def call(self, command: str, argv: list, timeout: float = 120, kill: tuple[int, str] | None = None) -> Result:
        result = fork_run(command, [str(a) for a in argv], self.tmp, timeout, kill)
        self.results.append(result)
        self.log.append(
            f"$ {COMMANDS[command][0]} {' '.join(map(str, argv))}\n-> rc {result.rc}\n{result.err[-3000:]}"
        )
        return result


@dataclass
class Case:
    name: str
    command: str
    body: Callable[[Ctx], Result]  # runs the case (setup, command(s)); raises Loss when a check fails
    expect: str = "OK"  # OK | CLEAN | ANY (either is right: the run decides, the check judges)
    line: str = ""  # a regex the error line (CLEAN) or the log (OK) must match
    timeout: float = 120


def fork_run(command: str, argv: list[str], cwd: Path, timeout: float, kill: tuple[int, str] | None) -> Result:
    """Runs `command`'s `cli()` with `argv` in a forked child; `kill` = (signal, regex): the signal is sent once the
    regex matches the child's output (``@S``: S seconds after the start)."""
    prog, module = COMMANDS[command]
    out_path, err_path = cwd / f".{prog}.out", cwd / f".{prog}.err"
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # the child: the console command
        code = 1
        try:
            # as in a terminal: a harness started in the background (`&`) inherits SIGINT ignored
            signal.signal(signal.SIGINT, signal.default_int_handler)
            os.chdir(cwd)
            for fd, path in ((1, out_path), (2, err_path)):
                os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
            sys.stdout = os.fdopen(1, "w", buffering=1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            sys.argv = [prog, *argv]
            importlib.import_module(module).cli()
            code = 0
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
            if not isinstance(exit_.code, int | None):
                print(exit_.code, file=sys.stderr)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    hung = killed = False
    status = None
    while status is None:
        done, raw = os.waitpid(pid, os.WNOHANG)
        if done:
            status = raw
            break
        if kill and not killed:
            due = kill[1].startswith("@") and time.monotonic() - start > float(kill[1][1:])
            if due or (not kill[1].startswith("@") and re.search(kill[1], _read(out_path) + _read(err_path))):
                os.kill(pid, kill[0])
                killed = True
        if time.monotonic() - start > timeout:
            os.kill(pid, signal.SIGKILL)
            status, hung = os.waitpid(pid, 0)[1], True
        time.sleep(0.05)
    rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
    return Result(rc, _read(out_path), _read(err_path), time.monotonic() - start, hung, killed)


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""


def classify(case: Case, ctx: Ctx) -> tuple[str, str]:
    """The case's class and a one-line reason."""
    try:
        last = case.body(ctx)
    except Loss as loss:
        return _traceback_or(ctx, "LOSS", str(loss))
    except Exception as err:  # the harness's own bug: shown, counted apart
        return "HARNESS", f"{type(err).__name__}: {err}"
    found = _traceback_or(ctx, "", "")
    if found[0]:
        return found
    if last.hung:
        return "HANG", f"no exit in {case.timeout:.0f} s"
    if last.rc == 2:
        lines = last.error_lines
        if not lines:
            return "TRACEBACK", "exit 2 without an error line: " + last.err.strip()[-200:]
        if case.expect == "OK":
            return "LOSS", "a valid command refused: " + lines[-1][:200]
        if case.line and not re.search(case.line, lines[-1]):
            return "CLEAN", f"refused, but the line does not name {case.line!r}: {lines[-1][:200]}"
        return "CLEAN", lines[-1][:200]
    if last.rc == 0:
        if case.expect == "CLEAN":
            return "LOSS", "exit 0 where a refusal was owed"
        if case.line and not re.search(case.line, last.out + last.err):
            return "LOSS", f"exit 0 without the line {case.line!r}"
        return "OK", ""
    return "TRACEBACK", f"exit {last.rc}: " + last.err.strip()[-200:]


def _traceback_or(ctx: Ctx, cls: str, reason: str) -> tuple[str, str]:
    for result in ctx.results:
        if TRACEBACK in result.err or TRACEBACK in result.out:
            tail = [line for line in result.err.splitlines() if line and not line.startswith(" ")]
            return "TRACEBACK", (tail[-1] if tail else "")[:200]
    return cls, reason


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/hostile"))
    parser.add_argument("--only", default="", help="a regex of case names to run")
    parser.add_argument("--list", action="store_true")
    args = parser.parse_args(argv)
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1")
    os.environ.update(HF_HOME=str(args.work / "hf_home"), TOKENIZERS_PARALLELISM="false")
    from difftune.scripts import hostile_cases

    cases = [c for c in hostile_cases.all_cases() if re.search(args.only, c.name)]
    if args.list:
        print("\n".join(f"{c.command:9} {c.expect:6} {c.name}" for c in cases), f"\n{len(cases)} cases")
        return
    _preload()
    world = args.work / "world"
    hostile_cases.build_world(world)
    counts: dict[str, Counter] = defaultdict(Counter)
    start = time.monotonic()
    results_path = args.work / "results.jsonl"
    with results_path.open("w") as results:
        for i, case in enumerate(cases):
            tmp = args.work / "cases" / case.name
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            ctx = Ctx(world, tmp)
            t0 = time.monotonic()
            cls, reason = classify(case, ctx)
            counts[case.command][cls] += 1
            row = dict(name=case.name, command=case.command, expect=case.expect, result=cls, reason=reason,
                       seconds=round(time.monotonic() - t0, 1), notes=ctx.notes)  # fmt: skip
            results.write(json.dumps(row) + "\n")
            results.flush()
            (tmp / "case.log").write_text("\n\n".join(ctx.log))
            print(f"[{i + 1}/{len(cases)}] {cls:9} {case.command:8} {case.name}  {reason[:150]}", flush=True)
            if cls in ("OK", "CLEAN"):
                shutil.rmtree(tmp, ignore_errors=True)
    print(summary(counts, time.monotonic() - start))


def summary(counts: dict[str, Counter], seconds: float) -> str:
    classes = ("OK", "CLEAN", "TRACEBACK", "LOSS", "HANG", "HARNESS")
    lines = [f"| command | cases | {' | '.join(classes)} |", "|---" * (len(classes) + 2) + "|"]
    total: Counter = Counter()
    for command in COMMANDS:
        if command in counts:
            c = counts[command]
            total.update(c)
            lines.append(f"| {COMMANDS[command][0]} | {sum(c.values())} | {' | '.join(str(c[k]) for k in classes)} |")
    lines.append(f"| all | {sum(total.values())} | {' | '.join(str(total[k]) for k in classes)} |")
    return "\n".join(lines) + f"\n\n{seconds / 60:.1f} minutes"


def _preload() -> None:
    """Imports every command's module (and what they import on first use) once, before the forks."""
    from difftune.core.startup import quiet_start

    quiet_start()
    for _, module in COMMANDS.values():
        importlib.import_module(module)
    for module in ("difftune.finetune.loop", "difftune.finetune.tasks", "difftune.finetune.cache", "peft"):
        importlib.import_module(module)


if __name__ == "__main__":  # the cases import this module by its name: one `Loss` class, theirs
    importlib.import_module("difftune.scripts.hostile_run").main()
