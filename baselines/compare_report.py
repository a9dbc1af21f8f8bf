"""The comparison's outputs: the trade-off table, the common wisdom set against it, the JSON, sample grids and plots.

`baselines.compare` measures; this module only summarises what it measured, over seeds, and says for each family
and aspect whether the measurement agrees with the common-wisdom claim, by the rules written in `RULES`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from difftune.baselines.verdicts import CONFIDENCE, RULES, ci_text, summarise, verdicts  # noqa: E402
from difftune.core.images import tensor_grid  # noqa: E402

# Published held-out bits/dim on 8-bit data (uniform dequantisation for the flows), for the table's notes.
PUBLISHED_BPD = """\
Published held-out bits/dim on 8-bit data, for scale (far larger models trained for days on GPUs). MNIST: RealNVP
1.06, Glow 1.05 (as collected in Grathwohl et al. 2019, "FFJORD: Free-form Continuous Dynamics for Scalable
Reversible Generative Models", Table 2). CIFAR-10: RealNVP 3.49 (Dinh et al. 2017, "Density estimation using Real
NVP", Table 1), Glow 3.35 (Kingma & Dhariwal 2018, "Glow: Generative Flow with Invertible 1x1 Convolutions",
Table 2), PixelCNN 3.14 (van den Oord et al. 2016, "Pixel Recurrent Neural Networks", Table 5), Gated PixelCNN 3.03
(van den Oord et al. 2016, "Conditional Image Generation with PixelCNN Decoders", Table 1), DDPM <= 3.75 (Ho et al.
2020, "Denoising Diffusion Probabilistic Models", Table 1, L_simple). Ours are measured the same way (8-bit data;
uniform dequantisation for Glow; discrete likelihoods for PixelCNN, the VAE's bound and DDPM's), on other data at
another resolution: the method is comparable, the numbers are not."""


def loss_roughness(losses: list[list[float]]) -> float | None:
    """Std of the step-to-step change of the logged loss / std of the loss: ~0 for a smooth curve, ~1.41 for noise."""
    values = np.asarray([v for _, v in losses], dtype=np.float64)
    if len(values) < 3 or not np.isfinite(values).all() or values.std() == 0:
        return None
    return float(np.diff(values).std() / values.std())


def coverage_ideal(n_real: int, n_fake: int, k: int) -> float:
    """Expected coverage when fake and real come from one distribution (Naeem et al. 2020, eq. 10):
    1 - prod_{i=1..k} (N - i) / (N + M - i), N real and M fake samples. It is below 1 when M is small beside N (2,000
    held-out images against 256 samples at k=5: 0.45), so a model's coverage is read against it."""
    miss = 1.0
    for i in range(1, k + 1):
        miss *= (n_real - i) / (n_real + n_fake - i)
    return 1.0 - miss


def budget_words(cfg: dict) -> str:
    if cfg["budget_steps"] is not None:
        return f"{cfg['budget_steps']:,} optimizer steps"
    if cfg["budget_images"] is not None:
        return f"{cfg['budget_images']:,} training images seen"
    return f"{cfg['budget_seconds']:g} s of wall clock (not reproducible on a loaded machine)"


def table_markdown(result: dict, summary: dict, verdict: dict) -> str:
    cfg, data = result["config"], result["data"]
    n_seeds = len(cfg["seeds"])
    lines = [
        "# Generative families compared, measured",
        "",
        f"Data: {data['source']}, {data['n_train']} training / {data['n_heldout']} held-out images of shape "
        f"{data['shape']}, {cfg['n_bits']}-bit. Budget per run: {budget_words(cfg)}, batch {cfg['batch_size']}. "
        f"Seeds: {cfg['seeds']}. Device: {result['device']}. Wall clock: {_duration(result['wall_seconds'])} for "
        f"this invocation, {_duration(sum(r['run_seconds'] for r in result['runs']))} in all runs together "
        f"({result['resumed_runs']} of {len(result['runs'])} runs read back from an earlier invocation).",
        "",
        f"Feature space: {result['feature_space']}.",
        "",
    ]
    lines += [f"**Note:** {n}" for n in result["notes"]] + ([""] if result["notes"] else [])
    lines += [
        f"Each family: mean over its {n_seeds} seeds with the {CONFIDENCE:.0%} t-interval in brackets. Quality: FD "
        f"(lower is better); P/R = precision/recall (k={cfg['k_precision']}), D/C = density/coverage "
        f"(k={cfg['k_density']}); coverage when samples and held-out images come from one distribution is "
        f"{result['coverage_ideal']:.2f} at these sample counts (Naeem et al. 2020's expectation), and the real-data "
        "row measures it. Mode collapse: share of modes covered, KL(generated || real label histogram, +0.5 "
        "pseudo-counts), mean pairwise feature distance relative to real images. Stability: seeds diverged "
        f"(non-finite loss, or samples no better than noise: FD >= {cfg['diverged_fd_ratio']:g} x the uniform-noise "
        "FD with precision within a tenth of the way from noise's to the real data's) and "
        "loss roughness (std of the step-to-step loss change / std of the loss; 0 smooth, 1.41 pure noise). Speed: "
        f"ms per image at batch {cfg['speed_batch']} (the fastest timed batch of each seed), network evaluations per "
        "image. Budget: optimizer steps and images seen per run, with the wall-clock seconds they took (training, "
        "then the whole run with sampling and evaluation); the seconds depend on the machine's load, the rest not.",
        "",
        "| family | quality | stability | speed | mode collapse | likelihood | budget; wall clock |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, ref in result["references"].items():
        lines.append(f"| *{name}* | {_quality_cell(ref)} | - | - | {_mode_cell(ref)} | - | - |")
    for f, s in summary.items():
        quality = "no finite samples" if s["fd"] is None else _quality_cell(_means(s), s["fd"])
        if s["nan_seeds"]:
            quality += f"; NaN samples in {s['nan_seeds']}/{s['n_seeds']} seeds (unscored)"
        stability = f"{s['diverged']}/{s['n_seeds']} diverged; roughness {ci_text(s['loss_roughness'], '.2f')}"
        speed = f"{ci_text(s['ms_per_image'])} ms/img; {_mean(s['evals_per_sample'], '.4g')} NFE/img"
        kind = s["likelihood"]
        like = "none" if kind == "none" else f"{ci_text(s['bits_per_dim'])} bits/dim ({kind})"
        spent = (
            f"{_mean(s['steps'], ',.0f')} steps, {_mean(s['images_seen'], ',.0f')} images; "
            f"{_mean(s['train_seconds'], '.3g')} s training, {_mean(s['run_seconds'], '.3g')} s in all"
        )
        lines.append(f"| {f} | {quality} | {stability} | {speed} | {_mode_cell(_means(s))} | {like} | {spent} |")
    aspects = list(next(iter(verdict.values())))
    lines += [
        "",
        f"## Common wisdom against the measurement ({n_seeds} seeds, {CONFIDENCE:.0%} intervals)",
        "",
        "| family | " + " | ".join(aspects) + " |",
        "|---" * (1 + len(aspects)) + "|",
    ]
    for f, v in verdict.items():
        cells = [f"claim: {claim} — **{outcome}** ({figure})" for claim, outcome, figure in v.values()]
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    lines += ["", "Verdict rules:", "", RULES, PUBLISHED_BPD, ""]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes} min {secs} s" if minutes else f"{secs} s"


def _means(s: dict) -> dict:
    return {k: v["mean"] for k, v in s.items() if isinstance(v, dict) and "mean" in v}


def _one(value: float | None, fmt: str = ".3g") -> str:
    return "n/a" if value is None else f"{value:{fmt}}"


def _mean(stat: dict | None, fmt: str = ".3g") -> str:
    return _one(stat and stat["mean"], fmt)


PRDC = ("precision", "recall", "density", "coverage")


def _quality_cell(r: dict, fd: dict | None = None) -> str:
    fd_text = ci_text(fd) if fd else _one(r.get("fd"))
    prdc = " ".join(f"{name} {_one(r.get(key), '.2f')}" for name, key in zip("PRDC", PRDC, strict=True))
    return f"FD {fd_text}; {prdc}"


def _mode_cell(r: dict) -> str:
    parts = []
    if r.get("modes_covered") is not None:
        parts += [f"modes {r['modes_covered']:.2f}", f"KL {r['kl_generated_real']:.2f}"]
    return "; ".join(parts + [f"pairwise {_one(r.get('pairwise_ratio'), '.2f')}"])


def write_plots(out: Path, result: dict, summary: dict) -> None:
    families = list(summary)
    fig, axes = plt.subplots(1, len(families), figsize=(3.2 * len(families), 2.8), squeeze=False)
    for ax, f in zip(axes[0], families, strict=True):
        for r in (r for r in result["runs"] if r["family"] == f):
            if r["losses"]:
                steps, values = zip(*r["losses"], strict=True)
                ax.plot(steps, values, label=f"seed {r['seed']}", lw=1)
        ax.set_title(f)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("training loss")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)

    x_key = "seconds" if result["config"]["budget_seconds"] is not None else "images_seen"
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for f in families:
        for i, r in enumerate(r for r in result["runs"] if r["family"] == f):
            pts = [p for p in r["quality_curve"] if p["fd"] is not None]
            if pts:
                ax.plot(
                    [p[x_key] for p in pts],
                    [p["fd"] for p in pts],
                    "o-",
                    color=f"C{families.index(f)}",
                    lw=1,
                    label=f if i == 0 else None,
                )
    for name, style in (("real data", "--"), ("uniform noise", ":")):
        ax.axhline(result["references"][name]["fd"], color="k", ls=style, lw=1, label=name)
    ax.set_yscale("log")
    ax.set_xlabel("training images seen" if x_key == "images_seen" else "training seconds")
    ax.set_ylabel("FD (held-out, lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "quality_vs_images.png", dpi=120)
    plt.close(fig)

    timed = [f for f in families if summary[f]["ms_per_image"]]
    fig, ax = plt.subplots(figsize=(5.5, 0.5 + 0.5 * max(len(timed), 1)))
    means = [summary[f]["ms_per_image"]["mean"] for f in timed]
    # the interval's half-width as the error bar (none from one seed), kept above zero for the log axis
    halves = [summary[f]["ms_per_image"]["hi"] - m for f, m in zip(timed, means, strict=True)]
    halves = [min(h, 0.999 * m) if math.isfinite(h) else 0.0 for h, m in zip(halves, means, strict=True)]
    ax.barh(timed, means, xerr=halves)
    for i, f in enumerate(timed):
        ax.text(means[i], i, f" {summary[f]['evals_per_sample']['mean']:.4g} NFE", va="center", fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel(f"ms per image at batch {result['config']['speed_batch']} ({result['device']})")
    fig.tight_layout()
    fig.savefig(out / "speed.png", dpi=120)
    plt.close(fig)


def save_grid(x: torch.Tensor, path: Path, min_width: int = 256) -> None:
    """A sample grid, enlarged with nearest-neighbour pixels so that small images stay readable."""
    if len(x) == 0:
        return
    grid = tensor_grid(x)
    scale = max(1, math.ceil(min_width / grid.width))
    grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST).save(path)


def write_outputs(out: Path, result: dict, grids: dict[str, torch.Tensor]) -> None:
    """table.md, table.json (every per-seed number plus the summary), samples_<family>.png and the plots."""
    summary = summarise(result)
    verdict = verdicts(summary, result)
    result["summary"] = summary
    result["verdicts"] = {
        f: {a: {"claim": c, "outcome": o, "measured": m} for a, (c, o, m) in v.items()} for f, v in verdict.items()
    }
    (out / "table.md").write_text(table_markdown(result, summary, verdict))
    (out / "table.json").write_text(json.dumps(_finite(result), indent=1))
    for family, x in grids.items():
        save_grid(x, out / f"samples_{family}.png")
    write_plots(out, result, summary)


def _finite(value):
    """The result as strict JSON: infinite or NaN numbers (an interval from one seed) become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
