"""The family comparison: strict config, clear errors on bad input, the evaluation classifier, and an end-to-end run
of every family on a tiny config (the command as users run it, and through `main`)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from baselines import FAMILIES
from baselines.classifier import train_classifier
from baselines.compare import CompareConfig, main, parse_args
from baselines.data import load_tensor
from core.errors import UserError, run_main
from toyworld.shapes import write_dataset

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
        ({"budget_seconds": 10.0}, "exactly one of budget_images and budget_seconds"),
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


def test_config_reads_types():
    config = load_config(REPO / "configs" / "compare_quick.yaml")
    assert isinstance(config, CompareConfig)
    assert config.families == list(FAMILIES) and len(config.seeds) >= 3
    full = load_config(REPO / "configs" / "compare_full.yaml")
    assert len(full.seeds) >= 3 and full.resolution >= config.resolution


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


def test_compare_end_to_end_on_the_shapes_world(tmp_path):
    out = tmp_path / "out"  # every family is imported and trained: one that fails to import fails this test
    result = main(["--config", str(write_config(tmp_path)), "--output_dir", str(out)])

    table = (out / "table.md").read_text()
    for row in ["*real data*", "*uniform noise*", *FAMILIES]:
        assert f"| {row} |" in table
    assert "Fréchet classifier distance" in table and "held-out accuracy" in table
    assert table.count("**agrees**") + table.count("**contradicts**") >= 4 * len(FAMILIES)

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


def test_dataset_without_labels_still_gets_the_other_columns(tmp_path):
    """Run as users run it, in a subprocess, on an imagefolder whose labels were not asked for."""
    write_dataset(tmp_path / "data", per_class=2, size=8)  # 24 images
    config = write_config(tmp_path, families=["vae"], seeds=[0], n_samples=16, n_samples_curve=8, quality_points=1)
    out = tmp_path / "out"
    command = ["--config", str(config), "--output_dir", str(out), "--train_data_dir", str(tmp_path / "data")]
    proc = subprocess.run(
        [sys.executable, "-m", "baselines.compare", *command], cwd=REPO, capture_output=True, text=True, timeout=300
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


def _run(family: str, seed: int, fd: float, ms: float, diverged: bool = False) -> dict:
    return {
        "family": family, "seed": seed, "fd": fd, "ms_per_image": ms, "diverged": diverged, "likelihood": "none",
        "modes_covered": 1.0, "kl_generated_real": 0.1, "pairwise_ratio": 1.0, "losses": [],
    }  # fmt: skip


def test_verdicts_follow_their_stated_rules():
    from baselines.compare_report import summarise, verdicts

    runs = [_run("gan", s, fd, 0.1, diverged=s == 0) for s, fd in enumerate([50.0, 10.0, 12.0])]
    runs += [_run("ddpm", s, 5.0 + s * 0.1, 100.0) for s in range(3)]
    runs += [_run("vae", s, 30.0, 0.2) for s in range(3)]
    runs[-1] |= {"pairwise_ratio": 0.1}  # one collapsed vae seed pulls the mean ratio to 0.7: not collapsed
    result = {
        "runs": runs,
        "config": {"unstable_cv": 0.25},
        "references": {"real data": {"modes_covered": 1.0, "kl_generated_real": 0.05}},
    }
    v = verdicts(summarise(result), result)
    assert v["gan"]["stability"][1] is True  # claimed unstable, one seed diverged
    assert v["ddpm"]["stability"][1] is True  # claimed stable, tiny spread
    assert v["ddpm"]["speed"][1] is True and "1e+03x fastest" in v["ddpm"]["speed"][2]  # slow: 1000x the GAN
    assert v["vae"]["speed"][1] is True  # fast: 2x the GAN
    assert v["ddpm"]["quality"][1] is True and v["vae"]["quality"][1] is True  # ranks 1 and 3 as the tiers say
    assert v["gan"]["quality"][1] is True  # rank 2 (mean FD 24): top tier with ddpm
    assert v["gan"]["mode collapse"][1] is False and v["vae"]["mode collapse"][1] is True
