"""The family comparison: strict config, clear errors on bad input, the evaluation classifier, and an end-to-end run
of every family on a tiny config (the command as users run it, and through `main`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from difftune.baselines import FAMILIES, build_model
from difftune.baselines.classifier import train_classifier
from difftune.baselines.compare import CompareConfig, main, parse_args
from difftune.baselines.data import load_tensor
from difftune.baselines.train import Budget, fit
from difftune.core.errors import UserError, run_main
from difftune.toyworld.shapes import write_dataset

REPO = Path(__file__).resolve().parents[2]

TINY = {
    "families": list(FAMILIES),
    "seeds": [0, 1, 2],
    "resolution": 8,
    "n_per_class": 10,
    "budget_images": 64,
    "batch_size": 16,
    "n_samples": 32,
    "n_samples_curve": 16,
    "quality_points": 2,
    "bpd_images": 8,
    "speed_batch": 16,
    "speed_repeats": 1,
    "classifier_steps": 60,
    "log_every": 1,
    "model_overrides": {
        "vae": {"hidden": 8, "latent_channels": 2},
        "gan": {"hidden": 8, "style_dim": 8, "n_mlp": 1},
        "pixelcnn": {"hidden": 12, "layers": 2, "kernel": 3},
        "glow": {"hidden": 8, "depth": 1, "n_levels": 1},
        "ddpm": {
            "block_out_channels": [8, 16],
            "norm_num_groups": 4,
            "num_train_timesteps": 4,
            "beta_start": 0.1,
            "beta_end": 0.6,
        },
    },
    "sample_options": {},
}


def load_config(path: Path) -> CompareConfig:
    return parse_args(["--config", str(path), "--output_dir", "unused"])


def write_config(tmp_path: Path, **changes) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({**TINY, **changes}))
    return path


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"n_sampels": 10}, "unknown key 'n_sampels'; did you mean 'n_samples'?"),
        ({"seeds": "0,1"}, r"seeds\[0\] must be an integer, got '0,1'"),
        ({"batch_size": 1.5}, "batch_size must be an integer, got 1.5"),
        ({"batch_size": True}, "batch_size must be an integer, got True"),
        ({"learning_rate": {"vae": "fast"}}, "learning_rate.vae must be a number, got 'fast'"),
        ({"budget_seconds": 10.0}, "exactly one of budget_steps, budget_images and budget_seconds"),
        ({"budget_images": None}, "exactly one of budget_steps, budget_images and budget_seconds"),
        ({"families": ["vae", "flow"]}, r"--families flow: unknown \(did you mean 'glow'\?\)"),
        ({"n_samples": 5}, "n_samples=5 is too few .* need more than 5"),
        ({"model_overrides": {"vae": {"hiden": 8}}}, "vae: unknown option 'hiden'"),
        ({"model_overrides": {"glow": {"depth": "deep"}}}, "glow: option depth must be an integer"),
        ({"sample_options": {"ddpm": {"scheduler": "dpmpp"}}}, "scheduler 'dpmpp': choose one of ddim, ddpm"),
        ({"feature_extractor": "inceptoin"}, "did you mean 'inception'"),
    ],
)
def test_config_rejects_bad_settings_naming_them(tmp_path, changes, message):
    with pytest.raises(UserError, match=message):
        load_config(write_config(tmp_path, **changes))


@pytest.mark.parametrize("name", ["compare_quick.yaml", "compare_32px.yaml", "compare_full.yaml"])
def test_presets_budget_in_steps_or_images_and_build_every_family(name):
    """Every preset reads, budgets in steps or images (never wall clock: it does not reproduce), has seeds for an
    interval, and builds each family's model at its resolution; then one training step each on tiny batches."""
    config = load_config(REPO / "configs" / name)
    assert config.families == list(FAMILIES) and len(config.seeds) >= 3
    assert config.budget_seconds is None and (config.budget_steps or config.budget_images)
    channels = config.channels or 3
    x = torch.rand(2, channels, config.resolution, config.resolution).mul(255).round().div(255)
    for family in config.families:
        torch.manual_seed(0)
        model = build_model(
            family, config.resolution, channels, config.n_bits, **config.model_overrides.get(family, {})
        )
        lr = config.learning_rate[family]
        result = fit(model, x, batch_size=2, lr=lr, budget=Budget(steps=1), seed=0)
        assert result.steps == 1 and not result.diverged, family


def test_yaml_numbers_and_flags_fill_the_same_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(
        "budget_images: 64\nlearning_rate: {vae: 1e-3}\nmodel_overrides: {ddpm: {block_out_channels: [8, 16]}}\n"
    )
    config = parse_args(["--config", str(path), "--output_dir", "o", "--seeds", "4", "5", "--families", "vae", "gan"])
    assert config.learning_rate == {"vae": 1e-3} and isinstance(config.learning_rate["vae"], float)
    assert (config.seeds, config.families, config.output_dir) == ([4, 5], ["vae", "gan"], "o")


def test_too_few_images_names_the_numbers(tmp_path):
    config = write_config(tmp_path, n_per_class=1, holdout_fraction=0.25)  # 12 images: 3 held out, k=5 needs 6
    with pytest.raises(UserError, match="9 for training and 3 held out; .* need at least 6"):
        main(["--config", str(config), "--output_dir", str(tmp_path / "out")])


def test_label_column_without_a_dataset_is_an_error(tmp_path):
    with pytest.raises(UserError, match="--label_column applies to --train_data_dir"):
        main(["--config", str(write_config(tmp_path)), "--output_dir", str(tmp_path / "o"), "--label_column", "x"])


def test_classifier_learns_colours_and_reports_held_out_accuracy():
    x, labels = load_tensor(shapes=True, resolution=8, n_per_class=12, seed=0)
    colours = sorted({label.split()[0] for label in labels})
    y = torch.tensor([colours.index(label.split()[0]) for label in labels])
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    train, test = order[:100], order[100:]
    model, report = train_classifier(x[train], y[train], x[test], y[test], len(colours), steps=80, seed=0)
    assert report.accuracy > 0.9 and report.n_test == len(test)
    assert model.embed(x[:5]).shape == (5, 64)


def test_compare_end_to_end_on_the_shapes_world(tmp_path, monkeypatch):
    out = tmp_path / "out"  # every family is imported and trained: one that fails to import fails this test
    result = main(["--config", str(write_config(tmp_path)), "--output_dir", str(out)])

    table = (out / "table.md").read_text()
    for row in ["*real data*", "*uniform noise*", *FAMILIES]:
        assert f"| {row} |" in table
    assert "Fréchet classifier distance" in table and "held-out accuracy" in table
    for family in FAMILIES:  # its verdict row: five aspects, each with one of the four outcomes
        row = next(line for line in table.splitlines() if line.startswith(f"| {family} | claim:"))
        assert sum(row.count(f"**{o}**") for o in ("agrees", "contradicts", "inconclusive", "no evidence")) == 5

    saved = json.loads((out / "table.json").read_text())
    assert len(saved["runs"]) == len(FAMILIES) * 3
    finite = [r for r in saved["runs"] if not r["loss_diverged"]]
    assert {r["family"] for r in finite} == set(FAMILIES)
    for r in finite:
        assert r["fd"] >= 0 and 0 <= r["coverage"] <= 1 and r["ms_per_image"] > 0 and r["losses"]
        assert (r["bits_per_dim"] is None) == (r["family"] == "gan")
        assert 0 < r["modes_covered"] <= 1
    real = saved["references"]["real data"]
    assert real["fd"] < saved["references"]["uniform noise"]["fd"]
    assert saved["classifier"]["n_classes"] == 12 and 0 <= saved["classifier"]["accuracy"] <= 1
    assert result["runs"] == saved["runs"]
    for name in ["loss_curves.png", "quality_vs_images.png", "speed.png", *(f"samples_{f}.png" for f in FAMILIES)]:
        assert (out / name).stat().st_size > 0
    assert "3 seeds, 95% intervals" in table and "64 training images seen" in table

    # The same command again reads every run back instead of training it, and writes the same numbers, scored in
    # the stored classifier's feature space (a classifier trained again on another thread count need not be equal).
    def no_training(*args, **kwargs):
        raise AssertionError("the evaluation classifier was trained again")

    monkeypatch.setattr("difftune.baselines.compare.train_classifier", no_training)
    again = main(["--config", str(write_config(tmp_path)), "--output_dir", str(out)])
    assert again["resumed_runs"] == len(FAMILIES) * 3 and again["runs"] == saved["runs"]
    assert again["verdicts"] == saved["verdicts"] and again["references"] == saved["references"]
    assert again["classifier"] == saved["classifier"]


def test_dataset_without_labels_still_gets_the_other_columns(tmp_path):
    """Run as users run it, in a subprocess, on an imagefolder whose labels were not asked for."""
    write_dataset(tmp_path / "data", per_class=2, size=8)  # 24 images
    config = write_config(tmp_path, families=["vae"], seeds=[0], n_samples=16, n_samples_curve=8, quality_points=1)
    out = tmp_path / "out"
    command = ["--config", str(config), "--output_dir", str(out), "--train_data_dir", str(tmp_path / "data")]
    proc = subprocess.run(
        [sys.executable, "-m", "difftune.baselines.compare", *command],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "table.json").read_text())
    assert any("no labels" in note for note in result["notes"])
    run = result["runs"][0]
    assert "modes_covered" not in run and run["fd"] >= 0 and 0 <= run["recall"] <= 1
    assert "randomly initialised" in (out / "table.md").read_text()


def test_user_folder_with_label_column_gets_mode_figures(tmp_path):
    write_dataset(tmp_path / "data", per_class=2, size=8)  # metadata.jsonl carries a "label" column
    config = write_config(tmp_path, families=["glow"], seeds=[0], n_samples=16, n_samples_curve=8, quality_points=1)
    argv = ["--config", str(config), "--output_dir", str(tmp_path / "out"), "--train_data_dir", str(tmp_path / "data")]
    result = main([*argv, "--label_column", "label"])
    assert len(result["data"]["classes"]) == 12 and not any("no labels" in n for n in result["notes"])
    assert 0 < result["runs"][0]["modes_covered"] <= 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--colour", "red"], "unknown flag --colour"),
        (["--output", "o"], "unknown flag --output; did you mean --output_dir?"),  # no abbreviations
        (["--mixed_precision", "fp61"], "--mixed_precision fp61: unknown (did you mean 'fp16'?)"),
        (["--families", "vae", "pixlecnn"], "--families pixlecnn: unknown (did you mean 'pixelcnn'?)"),
        (["--train_data_dir", "a", "--dataset_name", "b"], "give --train_data_dir or --dataset_name, not both"),
    ],
)
def test_command_line_prints_one_line_errors(tmp_path, capsys, flags, message):
    argv = ["--config", str(write_config(tmp_path)), "--output_dir", str(tmp_path / "o"), *flags]
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_an_unknown_config_key_is_one_line_naming_the_file(tmp_path, capsys):
    config = write_config(tmp_path, colour="red")
    with pytest.raises(SystemExit):
        run_main(main, ["--config", str(config), "--output_dir", str(tmp_path / "o")])
    assert capsys.readouterr().err.strip() == f"error: --config {config}: unknown key 'colour'"


def test_inception_without_local_weights_is_a_clear_error(tmp_path):
    config = write_config(tmp_path, families=["vae"], seeds=[0])
    args = ["--config", str(config), "--output_dir", str(tmp_path / "o"), "--feature_extractor", "inception"]
    with pytest.raises(UserError, match="torch-fidelity|Inception weights not found"):
        main([*args, "--inception_weights", str(tmp_path / "missing.pth")])


def test_a_folder_of_another_comparison_is_refused_in_one_line_and_overwrite_starts_over(tmp_path):
    from difftune.baselines.compare_store import RunStore

    settings = {"resolution": 8, "seeds": [0], "output_dir": "a"}
    store = RunStore(tmp_path, settings, overwrite=False, data="d")
    store.save("vae", 0, {"fd": 1.0}, torch.zeros(3, 1, 2, 2))
    assert store.done("vae", 0) and not store.done("vae", 1)
    # Other seeds, families or output folder: the completed runs still count.
    assert RunStore(tmp_path, {**settings, "seeds": [0, 1], "output_dir": "b"}, overwrite=False, data="d").done(
        "vae", 0
    )
    with pytest.raises(UserError, match=r"holds results of another comparison \(resolution: 8 there, 16 here\)"):
        RunStore(tmp_path, {**settings, "resolution": 16}, overwrite=False, data="d")
    assert not RunStore(tmp_path, {**settings, "resolution": 16}, overwrite=True, data="d").done("vae", 0)
    assert RunStore(tmp_path, {**settings, "resolution": 16}, overwrite=False, data="d")  # now resolution 16's
    assert not list((tmp_path / "runs").glob(".*tmp*"))  # written atomically: no temporary file left behind


def test_progress_estimates_time_left_including_evaluation():
    from difftune.baselines.compare_progress import Progress

    now = [0.0]
    runs = [("gan", 0), ("ddpm", 0), ("gan", 1), ("ddpm", 1)]
    progress = Progress(runs, {("gan", 0)}, samples_per_run=100, clock=lambda: now[0], disable=True)
    progress.start("ddpm", 0)
    assert progress.seconds_left() is None  # nothing measured yet
    now[0] = 10.0
    progress.training(0.5, 50)  # 10 s for half the training; no evaluation measured yet
    assert progress.seconds_left() is None
    progress.measured_eval(2.0, 20)  # an intermediate point: 0.1 s per sample -> 10 s for 100 samples
    # ddpm 0: 10 s training + 10 s evaluation left; ddpm 1: 30 s; gan 1: no finished gan run: the mean (30 s)
    assert progress.seconds_left() == pytest.approx(20 + 30 + 30)
    now[0] = 20.0
    progress.set_phase("sampling")
    now[0] = 35.0  # evaluation took longer than estimated: 15 s
    progress.finish()
    assert progress.finished["ddpm"] == [(20.0, 15.0)]
    assert progress.seconds_left() == pytest.approx(35 + 35)  # the two runs left, each as ddpm 0 cost


def test_progress_line_keeps_moving_through_a_long_phase(monkeypatch, capsys):
    """Between events (a minute-long sampling batch) the redraw thread still updates the clock and the time left."""
    import time

    from difftune.baselines.compare_progress import Progress

    monkeypatch.setattr(Progress, "REDRAW_SECONDS", 0.02)
    now = [0.0]
    progress = Progress([("gan", 0), ("gan", 1)], set(), samples_per_run=10, clock=lambda: now[0])
    for seed, start in [(0, 0.0), (1, 200.0)]:
        now[0] = start
        progress.start("gan", seed)
        now[0] = start + 100.0
        progress.set_phase("sampling")
        if seed == 0:
            now[0] = start + 200.0
            progress.finish()  # gan costs 200 s a run
    drawn = capsys.readouterr().err
    assert "gan seed 1: sampling; ~1m40s left" in drawn  # the last event, 100 s into the run
    now[0] = 350.0  # 50 s later, with no event
    deadline = time.monotonic() + 5
    while "~0m50s left" not in drawn and time.monotonic() < deadline:
        time.sleep(0.02)
        drawn += capsys.readouterr().err
    progress.close()
    assert "gan seed 1: sampling; ~0m50s left" in drawn


def test_coverage_ideal_follows_the_sample_counts():
    from difftune.baselines.compare_report import coverage_ideal

    assert coverage_ideal(2000, 256, 5) == pytest.approx(0.45, abs=0.01)  # the 8,000 digits' held-out quarter
    assert coverage_ideal(180, 256, 5) > 0.98  # the quick preset


def test_no_better_than_noise_needs_both_the_distance_and_the_precision():
    """At 32 px a briefly trained DDPM's blurred shapes scored an FD above noise's with precision 0.47 (noise 0.00):
    they are poor samples, not noise, and their family's verdicts are still evidence."""
    from difftune.baselines.verdicts import no_better_than_noise, run_diverged

    refs = {"real data": {"fd": 24.0, "precision": 0.98}, "uniform noise": {"fd": 2.69e5, "precision": 0.0}}
    assert not no_better_than_noise(3.05e5, 0.47, refs, 0.9)  # far in FD, but half its samples on the manifold
    assert no_better_than_noise(3.05e5, 0.05, refs, 0.9)  # far, and precision within a tenth of noise -> real
    assert not no_better_than_noise(1e3, 0.0, refs, 0.9)  # closer than noise by FD
    assert no_better_than_noise(None, None, refs, 0.9)  # no finite samples
    assert run_diverged({"loss_diverged": True, "fd": 30.0, "precision": 0.9}, refs, 0.9)  # the loss went NaN
    assert not run_diverged({"loss_diverged": False, "fd": 30.0, "precision": 0.9}, refs, 0.9)


def _run(family: str, seed: int, fd: float, ms: float, diverged: bool = False) -> dict:
    return {
        "family": family, "seed": seed, "fd": fd, "ms_per_image": ms, "diverged": diverged, "likelihood": "none",
        "modes_covered": 1.0, "kl_generated_real": 0.1, "pairwise_ratio": 1.0, "losses": [],
    }  # fmt: skip


def test_verdicts_follow_their_stated_rules_with_intervals():
    from difftune.baselines.verdicts import summarise, verdicts

    runs = [_run("gan", s, fd, 0.1, diverged=s == 0) for s, fd in enumerate([50.0, 10.0, 12.0])]
    runs += [_run("ddpm", s, 5.0 + s * 0.1, 100.0 + s) for s in range(3)]
    runs += [_run("vae", s, 300.0 + 20 * s, 0.2 + 0.01 * s) for s in range(3)]
    runs[-1] |= {"pairwise_ratio": 0.1}  # one collapsed vae seed: ratio interval straddles 0.5, inconclusive
    runs += [_run("glow", s, 990.0 + s, 0.1) for s in range(3)]  # FD of noise: no evidence
    result = {
        "runs": runs,
        "config": {"unstable_cv": 0.25, "diverged_fd_ratio": 0.9},
        "references": {
            "real data": {"modes_covered": 1.0, "kl_generated_real": 0.05},
            "uniform noise": {"fd": 1000.0},
        },
    }
    s = summarise(result)
    assert s["ddpm"]["fd"]["n"] == 3 and s["ddpm"]["fd"]["lo"] < 5.1 < s["ddpm"]["fd"]["hi"]
    v = {f: {a: outcome for a, (_, outcome, _) in aspects.items()} for f, aspects in verdicts(s, result).items()}
    assert v["gan"]["stability"] == "agrees"  # claimed unstable, one seed diverged
    assert v["ddpm"]["stability"] == "agrees"  # claimed stable: spread 0.02, its interval wholly below 0.25
    assert v["vae"]["stability"] == "inconclusive"  # spread 0.06: the interval with 3 seeds reaches past 0.25
    assert v["ddpm"]["speed"] == "agrees" and v["vae"]["speed"] == "agrees"  # ~1000x and ~2x the fastest
    assert v["ddpm"]["quality"] == "agrees" and v["vae"]["quality"] == "agrees"  # surely ranks 1 and 3 of 3
    assert v["gan"]["quality"] == "agrees"  # FD 24 [-32, 80]: rank 1 or 2, both in the top tier with ddpm
    assert v["gan"]["mode collapse"] == "contradicts" and v["vae"]["mode collapse"] == "inconclusive"
    assert v["glow"]["quality"] == v["glow"]["stability"] == v["glow"]["mode collapse"] == "no evidence"
    assert v["glow"]["likelihood"] == "contradicts" and v["glow"]["speed"] == "agrees"  # judged all the same
    one_seed = {**result, "runs": [r for r in runs if r["seed"] == 0]}
    v1 = verdicts(summarise(one_seed), one_seed)
    assert {v1[f]["quality"][1] for f in ("gan", "ddpm", "vae")} == {"inconclusive"}  # no interval from one seed
