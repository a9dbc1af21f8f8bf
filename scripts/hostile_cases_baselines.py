"""The hostile run's cases for difftune-train-baseline, difftune-compare and difftune-demo: every baseline family,
images of every mode, bad flags and `--set` options, a kill and resume, a comparison rerun after its data changed.
"""

from __future__ import annotations

import signal

from difftune.scripts import hostile_world as hw
from difftune.scripts.hostile_cases import case, fill
from difftune.scripts.hostile_run import Case, Ctx, Loss, Result

C = "CLEAN"

BASE = ("--shapes", "--n_per_class", "2", "--resolution", "8", "--max_train_steps", "1")


def baseline(name: str, *extra: str, expect: str = "OK", line: str = "", family: str = "vae", setup=None) -> Case:
    argv = ["--family", family, *BASE, "--output_dir", "{T}/o", *extra]
    return case(f"baseline-{name}", "baseline", argv, expect, line, setup, check=_has_model if expect != C else None)


def _has_model(ctx: Ctx, result: Result) -> None:
    if not list((ctx.tmp / "o").glob("*.safetensors")):
        raise Loss("exit 0 but no model saved")


def _odd_images(ctx: Ctx) -> None:
    """Images of every mode, four of each (the comparison's k-NN metrics need a few dozen); odd sizes in a
    `*mixed*` case."""
    folder = ctx.tmp / "imgs"
    folder.mkdir()
    modes = ("RGB", "L", "CMYK", "P", "RGBA", "I;16")
    for i in range(4 * len(modes)):
        mode = modes[i % len(modes)]
        size = (20 + i, 13 + 2 * i) if "mixed" in ctx.tmp.name else (13, 13)
        hw.picture(size, i, mode).save(folder / f"i{i}.{'jpg' if mode == 'CMYK' else 'png'}")


COMPARE = ("--families", "vae", "--seeds", "0", "--resolution", "8", "--n_per_class", "4", "--budget_steps", "1",
           "--classifier_steps", "1", "--n_samples", "8", "--n_samples_curve", "8", "--quality_points", "1")  # fmt: skip


def baselines() -> list[Case]:
    out = [baseline(f"family-{f}", family=f) for f in ("vae", "gan", "pixelcnn", "glow", "ddpm")]
    out += [
        baseline("family-unknown", family="vqvae", expect=C, line="family"),
        baseline("resolution-0", "--resolution", "0", expect=C, line="resolution"),
        baseline("resolution-7-glow", "--resolution", "7", family="glow", expect=C, line="resolution"),
        baseline("channels-2", "--channels", "2", expect=C, line="channels"),
        baseline("n-bits-0", "--n_bits", "0", expect=C, line="n_bits"),
        baseline("n-bits-9", "--n_bits", "9", expect=C, line="n_bits"),
        baseline("batch-zero", "--batch_size", "0", expect=C, line="batch_size"),
        baseline("lr-text", "--learning_rate", "x", expect=C, line="learning_rate"),
        baseline("set-typo", "--set", "latnt_dim=4", expect=C, line="latnt_dim"),
        baseline("set-wrong-type", "--set", "latent_channels=big", expect=C, line="latent_channels"),
        baseline("set-no-equals", "--set", "latent_dim", expect=C, line="latent_dim|KEY=VALUE"),
        baseline("output-is-file", "--output_dir", "{W}/d/img0.txt", expect=C, line="output_dir|img0.txt"),
        baseline(
            "mixed-sizes", "--no-shapes", "--train_data_dir", "{T}/imgs", setup=_odd_images, expect=C, line="one size"
        ),
        baseline(
            "odd-images", "--no-shapes", "--train_data_dir", "{T}/imgs", setup=_odd_images, expect=C, line="--channels"
        ),
        baseline(
            "odd-images-rgb", "--no-shapes", "--train_data_dir", "{T}/imgs", "--channels", "3", setup=_odd_images
        ),
        baseline(
            "odd-images-grey", "--no-shapes", "--train_data_dir", "{T}/imgs", "--channels", "1", setup=_odd_images
        ),
        baseline("no-data", "--no-shapes", expect=C, line="train_data_dir|shapes|dataset"),
        baseline("data-missing", "--no-shapes", "--train_data_dir", "{T}/none", expect=C, line="none"),
        baseline("resume-latest-fresh", "--resume_from_checkpoint", "latest"),
        baseline("resume-missing", "--resume_from_checkpoint", "{T}/none", expect=C, line="none"),
        Case("baseline-kill-resume", "baseline", _baseline_kill, "OK", "", 180),
        case("compare-vae", "compare", [*COMPARE, "--output_dir", "{T}/c"]),
        case(
            "compare-family-unknown",
            "compare",
            [*COMPARE, "--families", "vae", "sdxl", "--output_dir", "{T}/c"],
            C,
            "sdxl",
        ),
        case(
            "compare-seeds-duplicate",
            "compare",
            [*COMPARE, "--seeds", "0", "0", "--output_dir", "{T}/c"],
            "ANY",
            "seeds",
        ),
        case(
            "compare-budget-zero", "compare", [*COMPARE, "--budget_steps", "0", "--output_dir", "{T}/c"], C, "budget"
        ),
        case(
            "compare-holdout-1",
            "compare",
            [*COMPARE, "--holdout_fraction", "1.0", "--output_dir", "{T}/c"],
            C,
            "holdout_fraction",
        ),
        case(
            "compare-own-images",
            "compare",
            [*COMPARE, "--train_data_dir", "{T}/imgs", "--channels", "3", "--output_dir", "{T}/c"],
            "ANY",
            "",
            setup=_odd_images,
        ),
        case("compare-output-is-file", "compare", [*COMPARE, "--output_dir", "{W}/d/img0.txt"], C, "img0.txt"),
        case(
            "compare-config-typo",
            "compare",
            [*COMPARE, "--config", "{T}/c.yaml", "--output_dir", "{T}/c"],
            C,
            "budget_step",
            setup=lambda c: (c.tmp / "c.yaml").write_text("budget_step: 3\n"),
        ),
        case(
            "compare-feature-extractor-unknown",
            "compare",
            [*COMPARE, "--feature_extractor", "clip", "--output_dir", "{T}/c"],
            C,
            "feature_extractor",
        ),
        Case("compare-rerun-after-data-changed", "compare", _compare_data_changed, "ANY", "", 240),
    ]
    return out


def _baseline_kill(ctx: Ctx) -> Result:
    argv = fill(["--family", "vae", *BASE, "--max_train_steps", "400", "--checkpointing_steps", "20",
                 "--output_dir", "{T}/o"], ctx)  # fmt: skip
    first = ctx.call("baseline", argv, kill=(signal.SIGKILL, "@3"))
    ctx.notes.append(f"first run: exit {first.rc}, {'killed' if first.killed else 'ended before the signal'}")
    return ctx.call("baseline", [*argv, "--resume_from_checkpoint", "latest"])


def _compare_data_changed(ctx: Ctx) -> Result:
    _odd_images(ctx)
    argv = fill([*COMPARE, "--train_data_dir", "{T}/imgs", "--channels", "3", "--output_dir", "{T}/c"], ctx)
    first = ctx.call("compare", argv, timeout=120)
    if first.rc != 0:
        return first
    hw.picture((13, 13), 5).save(ctx.tmp / "imgs" / "i0.png")
    second = ctx.call("compare", argv, timeout=120)
    if second.rc == 0 and "reus" in second.err + second.out and "changed" not in second.err + second.out:
        raise Loss("the comparison reused runs trained on other images")
    return second


def demos() -> list[Case]:
    return [
        case("demo-help", "demo", ["--help"]),
        case("demo-unknown", "demo", ["--demo", "video"], C, "demo"),
        case("demo-work-dir-file", "demo", ["--work_dir", "{W}/d/img0.txt"], C, "work_dir|img0.txt"),
        case("demo-seed-text", "demo", ["--seed", "abc"], C, "seed"),
        case("demo-eval-seeds-zero", "demo", ["--eval_seeds", "0"], C, "eval_seeds"),
        case(
            "demo-config-typo",
            "demo",
            ["--config", "{T}/c.yaml"],
            C,
            "dem",
            setup=lambda c: (c.tmp / "c.yaml").write_text("dem: unet\n"),
        ),
        case("demo-config-missing", "demo", ["--config", "{T}/none.yaml"], C, "none.yaml"),
        case("demo-work-dir-unwritable", "demo", ["--work_dir", "/proc/difftune-demo"], C, "/proc"),
    ]
