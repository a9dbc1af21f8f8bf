"""The hostile run's resume and kill cases for difftune-train-lora / -train-full.

Kills go to the running command when a line of its log appears (a checkpoint saved, the cache built) or a number of
seconds after its start (whatever phase that is: loading, caching, a step, a save); the resumed run must end with the
very weights of an uninterrupted one.
"""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import torch
from safetensors.torch import load_file

from difftune.scripts import hostile_world as hw
from difftune.scripts.hostile_cases import case, fill, has_lora, train_argv
from difftune.scripts.hostile_run import Case, Ctx, Loss, Result, fork_run

C = "CLEAN"
LONG = ("--max_train_steps", "12", "--checkpointing_steps", "2")
GEN = ("--prompt", "a photo of sks dog", "--steps", "2", "--height", "32", "--width", "32", "--num_images", "1")


STRONG = ("--learning_rate", "0.05", "--max_train_steps", "4")  # an adapter that visibly changes the images
STRONG_RUNS = (("sd15", "sd15", ("--output_kohya_format",)), ("loha", "sd15", ("--adapter", "loha")), ("lokr", "sd15", ("--adapter", "lokr")),
               ("flux", "flux", ()), ("sdxl", "sdxl", ()), ("flux_kohya", "flux", ("--output_kohya_format",)))  # fmt: skip


def build_trained(world: Path) -> None:
    """The adapters generation cases load, and the uninterrupted run kills are compared with."""
    trained = world / "trained"
    runs = {
        "ref": ("sd15", LONG), "ref_full": ("sd15", ("--max_train_steps", "4", "--checkpointing_steps", "2")),
        "sd15": ("sd15", ("--output_kohya_format",)), "loha": ("sd15", ("--adapter", "loha")),
        "lokr": ("sd15", ("--adapter", "lokr")), "sdxl": ("sdxl", ()), "sd3": ("sd3", ()),
        "flux": ("flux", ("--output_kohya_format",)), "dora": ("sd15", ("--adapter", "dora")),
        **{f"strong_{name}": (model, (*STRONG, *extra)) for name, model, extra in STRONG_RUNS},
    }  # fmt: skip
    if not (trained / "record" / "g" / "record.json").exists():
        (trained / "record").mkdir(parents=True, exist_ok=True)
        argv = ["--model", str(world / "p" / "sd15"), *GEN, "--num_images", "2", "--output_dir", "g"]
        fork_run("generate", argv, trained / "record", 120, None)
    for name, (model, extra) in runs.items():
        out = trained / name
        if not (out / "progress.json").exists():
            command = "full" if name == "ref_full" else "lora"
            argv = fill(train_argv(model, "{W}/d", str(out), *extra), Ctx(world, trained))
            trained.mkdir(parents=True, exist_ok=True)
            result = fork_run(command, argv, trained, 300, None)
            if result.rc != 0:
                print(f"world: {name} failed ({result.rc}): {result.err[-500:]}")


def same_as(reference: str, out: str = "o", name: str = "pytorch_lora_weights.safetensors"):
    def check(ctx: Ctx, result: Result) -> None:
        a, b = load_file(ctx.world / "trained" / reference / name), load_file(ctx.tmp / out / name)
        if a.keys() != b.keys():
            raise Loss("the resumed run saved other tensors than the uninterrupted one")
        diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
        if diff != 0:
            raise Loss(f"the resumed run's weights differ from the uninterrupted run's (max diff {diff:.2e})")

    return check


def kill_resume(name: str, sig: int, when: str, *extra: str, command: str = "lora") -> Case:
    def body(ctx: Ctx) -> Result:
        steps = LONG if command == "lora" else ("--max_train_steps", "4", "--checkpointing_steps", "2")
        argv = fill(train_argv("sd15", "{W}/d", "{T}/o", *steps, *extra), ctx)
        first = ctx.call(command, argv, kill=(sig, when))
        ctx.notes.append(f"first run: exit {first.rc}, {'killed' if first.killed else 'ended before the signal'}")
        if first.rc not in (0, 130, -sig, 2) and not first.killed:
            return first
        second = ctx.call(command, [*argv, "--resume_from_checkpoint", "latest"])
        if second.rc == 0:
            if command == "lora":
                same_as("ref")(ctx, second)
            else:
                same_as("ref_full", name="unet/diffusion_pytorch_model.safetensors")(ctx, second)
            leftovers = [p.name for p in (ctx.tmp / "o").rglob("*") if p.name.endswith(".tmp")]
            if leftovers:
                raise Loss(f"left behind after the resume: {leftovers}")
        return second

    return Case(f"kill-{name}", command, body, "OK", "", 240)


def kills() -> list[Case]:
    K, INT, TERM = signal.SIGKILL, signal.SIGINT, signal.SIGTERM
    out = [kill_resume(f"{sig.name.lower()}-after-checkpoint-{n}", sig, rf"saved \S*checkpoint-{n}\b")
           for sig in (K, INT, TERM) for n in (2, 6)]  # fmt: skip
    out += [kill_resume(f"{sig.name.lower()}-at-{t}s", sig, f"@{t}") for sig in (K, INT) for t in (0.3, 0.8, 1.3, 1.8)]
    out += [
        kill_resume("sigkill-after-cache", K, "latent cache:"),
        kill_resume("sigint-after-cache", INT, "latent cache:"),
        kill_resume("sigkill-at-start-of-training", K, "training lora"),
        kill_resume("sigkill-during-save-every-step", K, "@1.0", "--checkpointing_steps", "1"),
        kill_resume("sigterm-during-save-every-step", TERM, "@1.2", "--checkpointing_steps", "1"),
        kill_resume("full-sigkill-after-checkpoint-2", K, r"saved \S*checkpoint-2\b", command="full"),
        kill_resume("full-sigint-after-checkpoint-2", INT, r"saved \S*checkpoint-2\b", command="full"),
        kill_resume("full-sigkill-at-1.5s", K, "@1.5", command="full"),
    ]
    return out


def two_runs(name: str, first: tuple, second, expect: str = "OK", line: str = "", check=None, prepare=None,
             model2: str = "sd15", command: str = "lora") -> Case:  # fmt: skip
    """A run of `first` flags, `prepare(ctx)`, then a second run (resume or rerun) of `second` flags."""

    def body(ctx: Ctx) -> Result:
        a = ctx.call(command, fill(train_argv("sd15", "{T}/data", "{T}/o", *first), ctx))
        if a.rc != 0:
            return a
        if prepare:
            prepare(ctx)
        b = ctx.call(command, fill(train_argv(model2, "{T}/data", "{T}/o", *second(ctx)), ctx))
        if b.rc == 0 and check:
            check(ctx, b)
        return b

    def with_data(ctx: Ctx) -> Result:
        hw.caption_folder(ctx.tmp / "data")
        return body(ctx)

    return Case(f"resume-{name}", command, with_data, expect, line, 240)


FOUR = ("--max_train_steps", "4", "--checkpointing_steps", "2")
SIX = ("--max_train_steps", "6", "--checkpointing_steps", "2")


def latest(*extra: str):
    return lambda ctx: (*FOUR, *extra, "--resume_from_checkpoint", "latest")


def exists(*names: str):
    def check(ctx: Ctx, result: Result) -> None:
        for name in names:
            if not list(ctx.tmp.glob(name)):
                raise Loss(f"{name} is gone")

    return check


def damage(path: str, how: str):
    def prepare(ctx: Ctx) -> None:
        target = ctx.tmp / path
        if how == "flip":
            data = bytearray(target.read_bytes())
            data[-10] ^= 0xFF
            target.write_bytes(bytes(data))
        elif how == "rm":
            target.unlink()
        elif how == "mkdir":
            target.mkdir()
        elif how == "truncate":
            target.write_bytes(target.read_bytes()[:100])

    return prepare


def weights_unchanged(ctx: Ctx, result: Result) -> None:
    before = ctx.tmp / "before.safetensors"
    a, b = load_file(before), load_file(ctx.tmp / "o" / "pytorch_lora_weights.safetensors")
    if any(not torch.equal(a[k], b[k]) for k in a):
        raise Loss("a finished run trained again on a resume with nothing left to do")


def keep_copy(ctx: Ctx) -> None:
    shutil.copy(ctx.tmp / "o" / "pytorch_lora_weights.safetensors", ctx.tmp / "before.safetensors")


def edit(name: str, text: str | None = None):
    def prepare(ctx: Ctx) -> None:
        path = ctx.tmp / "data" / name
        if text is None:
            hw.picture((40, 40), 9).save(path)
            path.with_suffix(".txt").write_text("a cat")
        else:
            path.write_text(text)

    return prepare


def resumes() -> list[Case]:
    lim = ("--checkpoints_total_limit", "1")
    return [
        two_runs(
            "extend", FOUR, lambda c: (*SIX, "--resume_from_checkpoint", "latest"), check=exists("o/checkpoint-6")
        ),
        two_runs("after-finish", FOUR, latest(), check=weights_unchanged, prepare=keep_copy),
        two_runs("explicit-path", FOUR, lambda c: (*FOUR, "--resume_from_checkpoint", f"{c.tmp}/o/checkpoint-2")),
        two_runs("relative-name", FOUR, lambda c: (*FOUR, "--resume_from_checkpoint", "checkpoint-2"), "ANY"),
        two_runs(
            "rerun-without-resume",
            FOUR,
            lambda c: FOUR,
            "ANY",
            "checkpoint|resume|output_dir",
            check=exists("o*/checkpoint-4", "**/checkpoint-4"),
        ),
        two_runs("changed-rank", FOUR, latest("--rank", "8"), C, "rank"),
        two_runs("changed-rank-allowed", FOUR, latest("--rank", "8", "--resume_allow_changes"), "ANY", "rank"),
        two_runs("changed-resolution", FOUR, latest("--resolution", "64"), C, "resolution"),
        two_runs("changed-lr", FOUR, latest("--learning_rate", "5e-3"), "ANY", "learning_rate"),
        two_runs("changed-optimizer", FOUR, latest("--optimizer", "adafactor"), C, "optimizer"),
        two_runs("changed-adapter", FOUR, latest("--adapter", "loha"), C, "adapter"),
        two_runs("changed-model", FOUR, latest(), C, "pretrained_model_name_or_path|model", model2="sdxl"),
        two_runs(
            "added-image",
            FOUR,
            lambda c: (*SIX, "--resume_from_checkpoint", "latest"),
            "ANY",
            "data|image",
            prepare=edit("new.png"),
        ),
        two_runs(
            "changed-caption",
            FOUR,
            lambda c: (*SIX, "--resume_from_checkpoint", "latest"),
            "ANY",
            "caption|data|img1",
            prepare=edit("img1.txt", "a totally different caption"),
        ),
        two_runs(
            "changed-mask",
            FOUR,
            lambda c: (*SIX, "--resume_from_checkpoint", "latest"),
            "ANY",
            "mask|data|img1",
            prepare=lambda c: hw.picture((40, 40), 3, "L").save(c.tmp / "data" / "img1_mask.png"),
        ),
        two_runs(
            "rewind-with-limit",
            SIX,
            lambda c: (
                *SIX,
                *lim,
                "--learning_rate",
                "2e-4",
                "--resume_allow_changes",
                "--resume_from_checkpoint",
                f"{c.tmp}/o/checkpoint-2",
            ),
            "ANY",
            "checkpoint-[46]",
            check=exists("**/checkpoint-6"),
        ),
        two_runs(
            "rewind-then-latest",
            SIX,
            lambda c: (*SIX, "--resume_from_checkpoint", f"{c.tmp}/o/checkpoint-2"),
            "ANY",
            "checkpoint",
        ),
        two_runs(
            "limit-1-extend",
            (*FOUR, *lim),
            lambda c: (*SIX, *lim, "--resume_from_checkpoint", "latest"),
            check=exists("o/checkpoint-6"),
        ),
        two_runs(
            "flipped-byte-in-weights",
            FOUR,
            latest(),
            "ANY",
            "checkpoint-4",
            prepare=damage("o/checkpoint-4/model.safetensors", "flip"),
        ),
        two_runs(
            "truncated-weights",
            FOUR,
            latest(),
            "ANY",
            "checkpoint-4",
            prepare=damage("o/checkpoint-4/model.safetensors", "truncate"),
        ),
        two_runs(
            "optimizer-removed",
            FOUR,
            latest(),
            "ANY",
            "checkpoint-4",
            prepare=damage("o/checkpoint-4/optimizer.safetensors", "rm"),
        ),
        two_runs(
            "manifest-removed",
            FOUR,
            latest(),
            "ANY",
            "checkpoint-4",
            prepare=damage("o/checkpoint-4/manifest.json", "rm"),
        ),
        two_runs(
            "state-json-garbage",
            FOUR,
            latest(),
            "ANY",
            "checkpoint-4",
            prepare=lambda c: (c.tmp / "o/checkpoint-4/state.json").write_text("{"),
        ),
        two_runs(
            "empty-checkpoint-folder", FOUR, latest(), "ANY", "checkpoint-8", prepare=damage("o/checkpoint-8", "mkdir")
        ),
        two_runs("stale-tmp-folder", FOUR, latest(), prepare=damage("o/checkpoint-6.tmp", "mkdir")),
        two_runs("odd-checkpoint-name", FOUR, latest(), prepare=damage("o/checkpoint-abc", "mkdir")),
        two_runs(
            "explicit-damaged",
            FOUR,
            lambda c: (*FOUR, "--resume_from_checkpoint", f"{c.tmp}/o/checkpoint-4"),
            C,
            "checkpoint-4",
            prepare=damage("o/checkpoint-4/model.safetensors", "flip"),
        ),
        two_runs(
            "numeric-order",
            ("--max_train_steps", "10", "--checkpointing_steps", "1"),
            lambda c: ("--max_train_steps", "11", "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest"),
            "OK",
            "checkpoint-10",
        ),
        two_runs(
            "full-extend",
            FOUR,
            lambda c: (*SIX, "--resume_from_checkpoint", "latest"),
            command="full",
            check=exists("o/model_index.json"),
        ),
        two_runs("full-changed-lr", FOUR, latest("--learning_rate", "1e-3"), "ANY", "learning_rate", command="full"),
        case(
            "resume-lora-checkpoint-into-full",
            "full",
            train_argv("sd15", "{W}/d", "{T}/o", *FOUR, "--resume_from_checkpoint", "{W}/trained/ref/checkpoint-4"),
            C,
            "checkpoint-4|lora|full",
        ),
        case(
            "resume-other-run-checkpoint",
            "lora",
            train_argv("sd15", "{W}/d", "{T}/o", *SIX, "--resume_from_checkpoint", "{W}/trained/ref/checkpoint-4"),
            "ANY",
            "",
            check=has_lora(),
        ),
    ]


def cases() -> list[Case]:
    from difftune.scripts.hostile_cases_baselines import baselines, demos
    from difftune.scripts.hostile_cases_generate import generation

    return [*kills(), *resumes(), *generation(), *baselines(), *demos()]
