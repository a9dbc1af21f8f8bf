"""The family comparison: every baseline family trained on the same data under one budget, measured the same way.

    difftune-compare --config configs/compare_quick.yaml --output_dir OUT
    difftune-compare --config configs/compare_quick.yaml --output_dir OUT \\
        --train_data_dir my_images --label_column label

Modes are the distinct values of `--label_column` (the shapes world's are its 12 colour-shape labels). A caption
column may stand in for labels by this rule: each distinct caption string is one mode, so `a handwritten digit seven`
and `a handwritten digit 7` would be two. Without labels the mode columns are skipped with a note, and the features
come from an untrained network of the classifier's shape; every other column is still computed.

Each family (vae, gan, pixelcnn, glow, ddpm) trains for every seed with the budget of the config: optimizer steps or
training images seen per run, so that the same config and seeds give the same table on an idle or a loaded machine
(a wall-clock budget, `budget_seconds`, is kept as an option; no preset uses it). Then each run draws samples, and
they are scored in one feature space: the penultimate features of a small classifier trained here on the real
training images (the "Fréchet classifier distance"), or Inception's with `--feature_extractor inception` and local
weights. Two reference rows bound the figures: real training images scored as if they were a model's samples ("real
data"), and uniform noise.

OUT receives `table.md` (the trade-off table and the common wisdom set against it, with 95% intervals over seeds),
`table.json` (every number per seed), `samples_<family>.png`, `loss_curves.png`, `quality_vs_images.png` and
`speed.png`. Every finished run is kept in `OUT/runs/` (`baselines.compare_store`): the same command again skips what
is complete, `--overwrite` starts over.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from difftune.baselines import FAMILIES, build_model, check_options
from difftune.baselines.classifier import EvalClassifier, random_feature_extractor, train_classifier
from difftune.baselines.compare_progress import Progress
from difftune.baselines.compare_report import coverage_ideal, loss_roughness, write_outputs
from difftune.baselines.compare_store import GRID_SIZE, RunStore
from difftune.baselines.data import load_tensor
from difftune.baselines.train import Budget, fit, make_state
from difftune.baselines.verdicts import run_diverged
from difftune.core import metrics
from difftune.core.config import option, parse
from difftune.core.errors import UserError, command
from difftune.core.paths import check_output_dir
from difftune.pipelines.samplers import sampler_names

DEFAULT_LR = {"vae": 1e-3, "gan": 2e-4, "pixelcnn": 1e-3, "glow": 5e-4, "ddpm": 1e-3}
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's file name, as torchmetrics loads it
FEATURES = ("classifier", "inception")
SPEED_EXTRA_SECONDS = 2.0  # at most this long spent on batches timed only for the speed figure


@dataclass
class CompareConfig:
    """Every setting of a comparison: a `--config` YAML file fills it (configs/compare_*.yaml), flags override it,
    and `core.config` refuses an unknown key or flag, a wrong type or an unknown family, naming it."""

    output_dir: str = option("where table.md, table.json, the sample grids and the plots go")
    families: list[str] = option("the families to train and measure", list(FAMILIES), choices=FAMILIES)
    seeds: list[int] = option("one run per family and seed", [0, 1, 2])
    resolution: int = option("image side in pixels", 16)
    channels: int | None = option("1 or 3; default: from the data (3 for the shapes world)", None)
    n_bits: int = option("bits per subpixel the data is quantised to", 8)
    n_per_class: int = option("shapes world only: images per colour and shape (12 classes)", 60)
    budget_steps: int | None = option(
        "optimizer steps per run (one of budget_steps, budget_images, budget_seconds)", None
    )
    budget_images: int | None = option("training images seen per run (one of the three budgets)", None)
    budget_seconds: float | None = option(
        "wall-clock seconds of training per run (one of the three budgets): steps then follow the machine's load, "
        "so a rerun on a busier machine trains less; prefer budget_steps or budget_images",
        None,
    )
    batch_size: int = option("images per training step", 32)
    learning_rate: dict[str, float] = option("family -> learning rate", dict(DEFAULT_LR))
    model_overrides: dict[str, dict[str, Any]] = option("family -> fields of its Config", {})
    sample_options: dict[str, dict[str, Any]] = option("family -> sample() options (ddpm: scheduler, steps)", {})
    holdout_fraction: float = option("real images kept out of training: the reference for every metric", 0.25)
    data_seed: int = option("seeds the split and the shapes world", 0)
    n_samples: int = option("generated images per run for the metrics", 256)
    k_precision: int = option("k of precision/recall (Kynkäänniemi et al. 2019)", 3)
    k_density: int = option("k of density/coverage (Naeem et al. 2020)", 5)
    quality_points: int = option("quality evaluations along training (the last one is the final model)", 3)
    n_samples_curve: int = option("samples per intermediate quality point", 128)
    bpd_images: int = option("held-out images for bits/dim", 128)
    speed_batch: int = option("batch size of the sampling-speed measurement", 64)
    speed_repeats: int = option(
        f"batches timed for the speed figure, the fastest counting (extra ones only within {SPEED_EXTRA_SECONDS:g} s)",
        5,
    )
    classifier_steps: int = option("training steps of the evaluation classifier", 600)
    classifier_min_accuracy: float = option("below this, mode figures are flagged as untrustworthy", 0.8)
    diverged_fd_ratio: float = option(
        "a run is no better than noise (diverged) when its FD >= this x uniform noise's and its precision is near "
        "noise's (baselines/verdicts.py)",
        0.9,
    )
    unstable_cv: float = option('"unstable": FD std/mean across seeds above this, or any seed diverged', 0.25)
    log_every: int = option("record the loss every N steps", 5)
    train_data_dir: str | None = option("a folder of images; default: the embedded shapes world", None)
    dataset_name: str | None = option("a datasets name or a local dataset folder", None)
    label_column: str | None = option("the column whose values are the modes (a caption works)", None)
    image_column: str = option("the dataset's image column", "image")
    caption_column: str = option("the dataset's caption column", "text")
    feature_extractor: str = option("the feature space of every metric", "classifier", choices=FEATURES)
    inception_weights: str | None = option(f"a local {INCEPTION_FILE} (feature_extractor inception)", None)
    mixed_precision: str = option("accelerate's mixed precision", "no", choices=("no", "fp16", "bf16"))
    overwrite: bool = option("redo every run, removing the results an earlier invocation left in output_dir", False)

    def validate(self) -> None:
        check_output_dir(self.output_dir)
        budgets = [b for b in (self.budget_steps, self.budget_images, self.budget_seconds) if b is not None]
        if len(budgets) != 1:
            raise UserError("set exactly one of budget_steps, budget_images and budget_seconds in the config")
        if budgets[0] <= 0:
            raise UserError(f"the budget must be positive, got {budgets[0]}")
        if self.train_data_dir is not None and self.dataset_name is not None:
            raise UserError("give --train_data_dir or --dataset_name, not both")
        if self.label_column is not None and self.train_data_dir is None and self.dataset_name is None:
            raise UserError(
                "--label_column applies to --train_data_dir or --dataset_name; the shapes world's modes are its "
                "colour-shape labels"
            )
        for key in list(self.learning_rate) + list(self.model_overrides) + list(self.sample_options):
            if key not in FAMILIES:
                raise UserError(f"unknown family {key!r} in learning_rate/model_overrides/sample_options")
        for family, overrides in self.model_overrides.items():
            check_options(family, overrides)
        sampler = self.sample_options.get("ddpm", {}).get("scheduler", "ddpm")
        if sampler not in sampler_names("ddpm"):  # the pixel DDPM is an epsilon model: no flow samplers
            raise UserError(
                f"sample_options ddpm scheduler {sampler!r}: choose one of {', '.join(sampler_names('ddpm'))}"
            )
        if len(self.seeds) < 1 or len(set(self.seeds)) != len(self.seeds):
            raise UserError(f"seeds must be distinct and at least one, got {self.seeds}")
        if not 0 < self.holdout_fraction < 1:
            raise UserError(f"holdout_fraction must lie in (0, 1), got {self.holdout_fraction}")
        for key in ("quality_points", "speed_repeats"):
            if getattr(self, key) < 1:
                raise UserError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key in ("n_samples", "n_samples_curve"):
            if getattr(self, key) <= max(self.k_precision, self.k_density):
                raise UserError(
                    f"{key}={getattr(self, key)} is too few for k-NN metrics with k_precision={self.k_precision}, "
                    f"k_density={self.k_density}: need more than {max(self.k_precision, self.k_density)}"
                )


def parse_args(argv: Sequence[str] | None) -> CompareConfig:
    description = "Train and measure every baseline family (--config configs/compare_quick.yaml or compare_full.yaml)."
    return parse(CompareConfig, argv, description, prog="difftune-compare")


# ----------------------------------------------------------------------------------------------- data and features


@dataclass
class Data:
    train: torch.Tensor  # (N_train, C, H, W) in [0, 1]
    heldout: torch.Tensor  # (N_heldout, C, H, W)
    y_train: torch.Tensor | None  # class indices, or None without labels
    y_heldout: torch.Tensor | None
    classes: list[str]  # the modes (empty without labels)
    source: str


def load_data(config: CompareConfig) -> Data:
    shapes = config.train_data_dir is None and config.dataset_name is None
    x, labels = load_tensor(
        shapes, config.train_data_dir, config.dataset_name, config.resolution, config.channels, config.n_bits,
        config.label_column, config.image_column, config.caption_column, n_per_class=config.n_per_class,
        seed=config.data_seed,
    )  # fmt: skip
    source = "shapes world" if shapes else (config.train_data_dir or config.dataset_name)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(config.data_seed))
    n_heldout = int(round(len(x) * config.holdout_fraction))
    need = max(config.k_precision, config.k_density) + 1
    if n_heldout < need or len(x) - n_heldout < need:
        raise UserError(
            f"{len(x)} images with holdout_fraction={config.holdout_fraction} leave {len(x) - n_heldout} for training "
            f"and {n_heldout} held out; k-NN metrics with k={need - 1} need at least {need} in each"
        )
    train_idx, held_idx = order[n_heldout:], order[:n_heldout]
    if labels is None:
        return Data(x[train_idx], x[held_idx], None, None, [], source)
    classes = sorted(set(labels))
    index = {label: i for i, label in enumerate(classes)}
    y = torch.tensor([index[label] for label in labels])
    return Data(x[train_idx], x[held_idx], y[train_idx], y[held_idx], classes, source)


def data_fingerprint(data: Data) -> str:
    """sha256 of the training and held-out images, their labels and the modes: what stored runs were made on."""
    digest = hashlib.sha256(json.dumps(data.classes).encode())
    for tensor in (data.train, data.heldout, data.y_train, data.y_heldout):
        if tensor is not None:
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


@dataclass
class Features:
    """The one feature space every sample set is scored in, plus the classifier that assigns modes (if any)."""

    embed: Callable[[torch.Tensor], torch.Tensor]  # (N, C, H, W) -> (N, D) on the CPU
    classifier: EvalClassifier | None  # predicts modes; None without labels
    description: str
    classifier_report: dict | None


def build_features(config: CompareConfig, data: Data, accelerator, store: RunStore) -> Features:
    report, classifier, device = None, None, accelerator.device
    if data.y_train is not None:
        # The classifier that scored the stored runs, if any: a resume scores in the same feature space.
        classifier = EvalClassifier(data.train.shape[1], len(data.classes))
        report = store.load_model("classifier", classifier)
        if report is None:
            classifier, rep = train_classifier(
                data.train, data.y_train, data.heldout, data.y_heldout, len(data.classes),
                steps=config.classifier_steps, seed=config.data_seed, accelerator=accelerator,
            )  # fmt: skip
            report = dataclasses.asdict(rep)
            store.save_model("classifier", classifier, report)
        classifier = classifier.to(device).eval()
        report["trustworthy"] = report["accuracy"] >= config.classifier_min_accuracy
    if config.feature_extractor == "inception":
        embed = _inception_embed(device, config.inception_weights)
        description = "Inception-v3 pool features (2048-d, torchmetrics' FID network): FID"
    elif classifier is not None:
        embed = classifier.embed
        description = (
            f"Fréchet classifier distance: penultimate features (64-d) of a CNN trained here on the "
            f"{len(data.train)} real training images ({len(data.classes)} classes, held-out accuracy "
            f"{report['accuracy']:.3f}); comparable within this table only, not with Inception FID"
        )
    else:
        embed = random_feature_extractor(data.train.shape[1], config.data_seed, device).embed
        description = (
            "features of a randomly initialised, untrained CNN (64-d): the data has no labels to train the "
            "classifier on; comparable within this table only"
        )
    return Features(embed, classifier, description, report)


def _inception_embed(device: torch.device, weights: str | None):
    """Inception features through torchmetrics, from local weights only: this tool never downloads anything."""
    try:
        import torch_fidelity  # noqa: F401  (torchmetrics' Inception backend)
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as err:
        raise UserError(
            "--feature_extractor inception needs torch-fidelity (torchmetrics' Inception backend), which is not "
            "installed; use --feature_extractor classifier"
        ) from err
    path = Path(weights) if weights else Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if not path.exists():
        raise UserError(
            f"Inception weights not found at {path}; difftune never downloads them. Put {INCEPTION_FILE} there "
            "(or pass --inception_weights PATH), or use --feature_extractor classifier"
        )
    net = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(path)).to(device)

    @torch.no_grad()
    def embed(x: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        out = []
        for i in range(0, len(x), batch_size):
            xb = (x[i : i + batch_size] * 255).round().to(torch.uint8)  # (B, C, H, W) uint8, as FID expects
            xb = xb.expand(-1, 3, -1, -1) if xb.shape[1] == 1 else xb
            out.append(net(xb.to(device)).reshape(len(xb), -1).cpu())
        return torch.cat(out)

    return embed


def score(config: CompareConfig, features: Features, data: Data, real_feats, samples: torch.Tensor) -> dict:
    """Every sample-quality and mode figure of one sample set against the held-out real images."""
    fake = features.embed(samples)
    out = {"fd": metrics.frechet_distance(real_feats, fake)}
    out |= metrics.precision_recall(real_feats, fake, k=config.k_precision)
    out |= metrics.density_coverage(real_feats, fake, k=config.k_density)
    out["pairwise_ratio"] = metrics.pairwise_distance_ratio(real_feats, fake)
    if features.classifier is not None:
        pred = features.classifier.predict(samples).numpy()
        out |= metrics.mode_stats(pred, data.y_heldout.numpy(), len(data.classes))
    return out


# ----------------------------------------------------------------------------------------------- one run


@torch.no_grad()
def draw(
    model, n: int, batch: int, seed: int, device: torch.device, options: dict, repeats: int = 1
) -> tuple[torch.Tensor, float]:
    """n samples in batches of `batch`, and the milliseconds per image of the fastest timed batch.

    The fastest, not the median: load from other jobs only ever adds time, so the minimum is the figure that repeats
    on a busy machine. A batch that takes milliseconds is easily caught whole by another job's burst, so up to
    `repeats` batches are timed in all where the extra ones fit in `SPEED_EXTRA_SECONDS`, drawn with another
    generator: the samples returned are the same however many batches were timed."""
    generator = torch.Generator(device).manual_seed(seed)
    out, per_image = [], []
    for start in range(0, n, batch):
        size = min(batch, n - start)
        seconds, x = _timed(model, size, generator, device, options)
        if size == batch or not per_image:
            per_image.append(seconds * 1000 / size)
        out.append(x.detach().float().clamp(0, 1).cpu())
    spare, extra = torch.Generator(device).manual_seed(seed + 1), 0.0
    while len(per_image) < repeats and extra + min(per_image) * batch / 1000 <= SPEED_EXTRA_SECONDS:
        seconds, _ = _timed(model, batch, spare, device, options)
        per_image.append(seconds * 1000 / batch)
        extra += seconds
    return torch.cat(out), float(np.min(per_image))


def _timed(model, size: int, generator, device: torch.device, options: dict) -> tuple[float, torch.Tensor]:
    _sync(device)
    t0 = time.perf_counter()
    x = model.sample(size, generator=generator, **options)
    _sync(device)
    return time.perf_counter() - t0, x


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def held_out_bpd(model, x: torch.Tensor, batch: int, device: torch.device) -> float | None:
    if model.likelihood == "none":
        return None
    values = [model.bits_per_dim(x[i : i + batch].to(device)).float().cpu() for i in range(0, len(x), batch)]
    return float(torch.cat(values).mean())


def run_one(
    family, seed, config, data, features, real_feats, accelerator, progress, references
) -> tuple[dict, torch.Tensor]:
    """Trains one family with one seed, then measures it: quality, modes, speed, likelihood, and its training curve."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    overrides = config.model_overrides.get(family, {})
    model = build_model(family, config.resolution, data.train.shape[1], config.n_bits, **overrides)
    device = accelerator.device
    options = config.sample_options.get(family, {})
    fit_result, curve = train_with_curve(
        model, family, seed, config, data, features, real_feats, accelerator, progress
    )
    record = {
        "family": family, "seed": seed, "steps": fit_result.steps, "images_seen": fit_result.images_seen,
        "train_seconds": fit_result.seconds, "loss_diverged": fit_result.diverged,
        "losses": [[s, v] for s, v in fit_result.losses], "loss_roughness": loss_roughness(fit_result.losses),
        "likelihood": model.likelihood,
        "evals_per_sample": float(model.evals_per_sample(config.speed_batch, **options)),
        "parameters": sum(p.numel() for p in model.parameters()),
    }  # fmt: skip
    # A run whose loss went non-finite keeps its last finite weights (fit stops before stepping): measure those.
    progress.set_phase("sampling")
    samples, ms = draw(model, config.n_samples, config.speed_batch, seed, device, options, config.speed_repeats)
    record["ms_per_image"] = ms
    record["non_finite_samples"] = int((~torch.isfinite(samples.flatten(1))).any(dim=1).sum())
    progress.set_phase("scoring")
    if record["non_finite_samples"] == 0:
        record |= score(config, features, data, real_feats, samples)
        curve.append({"images_seen": fit_result.images_seen, "seconds": fit_result.seconds, "fd": record["fd"]})
    else:
        samples = torch.zeros((0, *data.train.shape[1:]))
    progress.set_phase("bits/dim")
    record["bits_per_dim"] = held_out_bpd(model, data.heldout[: config.bpd_images], config.speed_batch, device)
    record["quality_curve"] = curve
    record["diverged"] = run_diverged(record, references, config.diverged_fd_ratio)
    record["run_seconds"] = time.perf_counter() - start
    return record, samples


def _budget(config: CompareConfig, share: float) -> Budget:
    """The budget for `share` of a run."""
    if config.budget_steps is not None:
        return Budget(steps=math.ceil(config.budget_steps * share))
    if config.budget_images is not None:
        return Budget(images=math.ceil(config.budget_images * share))
    return Budget(seconds=config.budget_seconds * share)


def train_with_curve(model, family, seed, config, data, features, real_feats, accelerator, progress):
    """`fit` in `quality_points` chunks of the budget, resumed from its state, with FD measured between chunks.

    Resuming is exact (fit seeds batches by step), and the time spent measuring is not training time. `fit` copies
    the EMA weights in when it returns, so the raw weights are kept at the chunk's last step and put back after
    measuring: training goes on from where it was, not from the EMA.
    """
    lr = config.learning_rate.get(family, DEFAULT_LR[family])
    state = make_state(model, lr)
    trainable = [p for p in model.parameters() if p.requires_grad]
    curve, whole = [], _budget(config, 1.0)
    for point in range(1, config.quality_points + 1):
        budget = _budget(config, point / config.quality_points)
        raw: list[torch.Tensor] = []

        def on_step(s, budget=budget, raw=raw):
            progress.training(whole.fraction(s.images_seen, s.seconds, s.step), s.step)
            if budget.spent(s.images_seen, s.seconds, s.step) and state.ema is not None:
                raw[:] = [p.detach().clone() for p in trainable]

        result = fit(
            model, data.train, batch_size=config.batch_size, lr=lr, budget=budget, seed=seed,
            accelerator=accelerator, log_every=config.log_every, state=state, on_step=on_step,
        )  # fmt: skip
        if result.diverged or point == config.quality_points:
            return result, curve
        measure_start = time.perf_counter()
        progress.set_phase("quality point")
        options = config.sample_options.get(family, {})
        samples, _ = draw(model, config.n_samples_curve, config.speed_batch, seed, accelerator.device, options)
        finite = bool(torch.isfinite(samples).all())  # NaN samples (a flow's inverse can overflow) have no features
        fd = metrics.frechet_distance(real_feats, features.embed(samples)) if finite else None
        curve.append({"images_seen": result.images_seen, "seconds": result.seconds, "fd": fd})
        progress.measured_eval(time.perf_counter() - measure_start, config.n_samples_curve)
        progress.set_phase("training")
        for p, r in zip(trainable, raw, strict=False):  # raw is empty without an EMA
            p.data.copy_(r)
    return result, curve


# ----------------------------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> dict:
    from accelerate import Accelerator

    config = parse_args(argv)
    started = time.perf_counter()
    out = Path(config.output_dir)
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    device = accelerator.device
    data = load_data(config)
    out.mkdir(parents=True, exist_ok=True)
    store = RunStore(out, dataclasses.asdict(config), config.overwrite, data_fingerprint(data))
    notes = []
    if data.y_train is None:
        notes.append(
            "no labels (pass --label_column): mode coverage and KL are not computed; the other columns are, "
            "and the pairwise-distance ratio still measures diversity"
        )
    features = build_features(config, data, accelerator, store)
    rep = features.classifier_report
    if rep is not None and not rep["trustworthy"]:
        notes.append(
            f"the evaluation classifier's held-out accuracy {rep['accuracy']:.3f} is below "
            f"{config.classifier_min_accuracy}: too low to judge modes; treat the mode columns as unreliable"
        )
    real_feats = features.embed(data.heldout)
    references = _references(config, features, data, real_feats)
    # Seed-major: after the first round every family has been timed, so the estimate of time left covers the rest.
    order = [(family, seed) for seed in config.seeds for family in config.families]
    done = {run for run in order if store.done(*run)}
    records, grids = {}, {}
    progress = Progress(order, done, config.n_samples + (config.quality_points - 1) * config.n_samples_curve)
    try:
        for family, seed in order:
            if (family, seed) in done:
                record, samples = store.load(family, seed)
                record["diverged"] = run_diverged(record, references, config.diverged_fd_ratio)  # today's rule
            else:
                progress.start(family, seed)
                record, samples = run_one(
                    family, seed, config, data, features, real_feats, accelerator, progress, references
                )
                store.save(family, seed, record, samples)
                progress.finish()
                progress.write(
                    f"{family} seed {seed}: FD {record.get('fd', float('nan')):.3f}, diverged {record['diverged']}, "
                    f"{record['steps']} steps, {record['run_seconds']:.0f} s"
                )
            records[family, seed] = record
            if len(grids.get(family, ())) == 0:  # the first seed with finite samples
                grids[family] = samples[:GRID_SIZE]
    finally:
        progress.close()
    runs = [records[family, seed] for family in config.families for seed in config.seeds]
    result = {
        "config": dataclasses.asdict(config),
        "data": {"source": data.source, "n_train": len(data.train), "n_heldout": len(data.heldout),
                 "classes": data.classes, "shape": list(data.train.shape[1:])},
        "device": _device_name(device),
        "feature_space": features.description,
        "classifier": rep,
        "notes": notes,
        "references": references,
        "coverage_ideal": coverage_ideal(len(data.heldout), config.n_samples, config.k_density),
        "runs": runs,
        "resumed_runs": len(done),
        "wall_seconds": time.perf_counter() - started,
    }  # fmt: skip
    write_outputs(out, result, grids)
    print((out / "table.md").read_text())
    return result


def _references(config, features, data, real_feats) -> dict:
    """Real training images and uniform noise scored exactly as a model's samples are."""
    n = min(config.n_samples, len(data.train))
    pick = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(config.data_seed + 1))[:n]
    levels = 2**config.n_bits - 1
    g = torch.Generator().manual_seed(config.data_seed + 2)
    noise = torch.randint(0, levels + 1, (config.n_samples, *data.train.shape[1:]), generator=g) / levels
    real = score(config, features, data, real_feats, data.train[pick])
    real["n_samples"] = n
    return {"real data": real, "uniform noise": score(config, features, data, real_feats, noise)}


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({torch.get_num_threads()} threads)"


def cli() -> None:
    """The `difftune-compare` command."""
    command(main)


if __name__ == "__main__":
    cli()
