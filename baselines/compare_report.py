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

from core.images import tensor_grid  # noqa: E402

# The common wisdom this comparison answers (issue 6): quality out of 10, stability, speed, collapse, likelihood.
CLAIMS: dict[str, dict[str, object]] = {
    "vae": {"quality": 6.0, "stable": True, "speed": "fast", "collapse": False, "likelihood": "approximate"},
    "gan": {"quality": 9.0, "stable": False, "speed": "fast", "collapse": True, "likelihood": "none"},
    "pixelcnn": {"quality": 7.5, "stable": True, "speed": "very slow", "collapse": False, "likelihood": "exact"},
    "glow": {"quality": 7.5, "stable": True, "speed": "fast", "collapse": False, "likelihood": "exact"},
    "ddpm": {"quality": 9.5, "stable": True, "speed": "slow", "collapse": False, "likelihood": "approximate"},
}
LIKELIHOOD_KIND = {"exact": "exact", "bound": "approximate", "none": "none"}
FAST_RATIO = 10.0  # "fast": at most this many times the fastest family's ms/image
RULES = f"""\
- Quality: claims are grouped in tiers (>= 9/10, 7-8/10, 6/10); a family agrees when its rank by mean FD (1 = best)
  falls in the ranks its tier would hold among the families compared.
- Stability: measured unstable when any seed diverged or the seeds' FD spread (std / mean) exceeds the config's
  `unstable_cv`; the claim is 3/10 (unstable) for the GAN and 8-10/10 (stable) for the others.
- Speed: fast = at most {FAST_RATIO:g}x the fastest family's ms/image at the speed batch, otherwise slow; "very slow"
  agrees when slow and slower than every family claimed "slow". The flow's "fast" is not in the common-wisdom list;
  it is the expectation of one inverse pass.
- Mode collapse: measured when, on the mean over seeds, modes covered < 0.9 x the real-data row's, or KL(generated
  || real) > the real-data row's + 0.5 nats, or the pairwise-distance ratio < 0.5.
- Likelihood: the kind the model computes (exact, bound = approximate, none), with its held-out bits/dim.
"""


def loss_roughness(losses: list[list[float]]) -> float | None:
    """Std of the step-to-step change of the logged loss / std of the loss: ~0 for a smooth curve, ~1.41 for noise."""
    values = np.asarray([v for _, v in losses], dtype=np.float64)
    if len(values) < 3 or not np.isfinite(values).all() or values.std() == 0:
        return None
    return float(np.diff(values).std() / values.std())


def _stats(values: list) -> tuple[float, float] | None:
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if not vals:
        return None
    return float(np.mean(vals)), float(np.std(vals))


def summarise(result: dict) -> dict[str, dict]:
    """Per family: mean and std over seeds of every figure, diverged count, and the figures the verdicts need."""
    keys = ("fd", "precision", "recall", "density", "coverage", "modes_covered", "kl_generated_real")
    keys += ("pairwise_ratio", "ms_per_image", "evals_per_sample", "bits_per_dim", "loss_roughness")
    summary = {}
    for family in dict.fromkeys(r["family"] for r in result["runs"]):
        runs = [r for r in result["runs"] if r["family"] == family]
        s = {k: _stats([r.get(k) for r in runs]) for k in keys}
        s["n_seeds"], s["diverged"] = len(runs), sum(r["diverged"] for r in runs)
        s["nan_seeds"] = sum(r.get("non_finite_samples", 0) > 0 for r in runs)  # runs whose samples held NaN
        s["likelihood"] = runs[0]["likelihood"]
        fd = s["fd"]
        s["fd_cv"] = fd[1] / fd[0] if fd and fd[0] > 0 else None
        summary[family] = s
    return summary


def verdicts(summary: dict, result: dict) -> dict[str, dict[str, tuple[str, bool | None, str]]]:
    """family -> aspect -> (claim, agrees (None: not measurable), measured figure)."""
    cv_max = result["config"]["unstable_cv"]
    real = result["references"]["real data"]
    families = [f for f in summary if summary[f]["fd"]]
    by_fd = sorted(families, key=lambda f: summary[f]["fd"][0])
    fastest = min((s["ms_per_image"][0] for s in summary.values() if s["ms_per_image"]), default=None)

    def tier(f: str) -> int:
        q = CLAIMS[f]["quality"]
        return 3 if q >= 9 else 2 if q >= 7 else 1

    out = {}
    for f, s in summary.items():
        c, v = CLAIMS[f], {}
        if f in by_fd:
            rank = by_fd.index(f) + 1
            lo = 1 + sum(tier(g) > tier(f) for g in families)
            hi = sum(tier(g) >= tier(f) for g in families)
            v["quality"] = (f"{c['quality']:g}/10", lo <= rank <= hi, f"FD rank {rank}/{len(families)}")
        else:
            v["quality"] = (f"{c['quality']:g}/10", None, "no finite samples")
        unstable = s["diverged"] > 0 or (s["fd_cv"] is not None and s["fd_cv"] > cv_max)
        cv = f"{s['fd_cv']:.2f}" if s["fd_cv"] is not None else "n/a"
        v["stability"] = (
            "unstable (3/10)" if not c["stable"] else "stable (8-10/10)",
            unstable == (not c["stable"]),
            f"{s['diverged']}/{s['n_seeds']} diverged, FD std/mean {cv}",
        )
        v["speed"] = _speed_verdict(f, summary, fastest)
        v["mode collapse"] = _collapse_verdict(c["collapse"], s, real)
        kind = LIKELIHOOD_KIND[s["likelihood"]]
        bpd = s["bits_per_dim"]
        figure = f"{kind}, {bpd[0]:.3f} bits/dim" if bpd else kind
        v["likelihood"] = (str(c["likelihood"]), kind == c["likelihood"], figure)
        out[f] = v
    return out


def _speed_verdict(f: str, summary: dict, fastest: float | None) -> tuple[str, bool | None, str]:
    claim, ms = CLAIMS[f]["speed"], summary[f]["ms_per_image"]
    if ms is None or not fastest:
        return (claim, None, "not measured")
    ratio = ms[0] / fastest
    measured_fast = ratio <= FAST_RATIO
    if claim == "fast":
        agrees = measured_fast
    elif claim == "slow":
        agrees = not measured_fast
    else:
        slow_claimed = [
            summary[g]["ms_per_image"][0]
            for g in summary
            if CLAIMS[g]["speed"] == "slow" and summary[g]["ms_per_image"]
        ]
        agrees = not measured_fast and all(ms[0] > other for other in slow_claimed)
    return (claim, agrees, f"{ms[0]:.3g} ms/image ({ratio:.3g}x fastest)")


def _collapse_verdict(claim: bool, s: dict, real: dict) -> tuple[str, bool | None, str]:
    ratio = s["pairwise_ratio"]
    if ratio is None:
        return ("yes" if claim else "no", None, "not measured")
    signs, figure = [ratio[0] < 0.5], [f"pairwise ratio {ratio[0]:.2f}"]
    if s["modes_covered"] is not None and "modes_covered" in real:
        signs.append(s["modes_covered"][0] < 0.9 * real["modes_covered"])
        signs.append(s["kl_generated_real"][0] > real["kl_generated_real"] + 0.5)
        figure[:0] = [f"modes {s['modes_covered'][0]:.2f}", f"KL {s['kl_generated_real'][0]:.2f}"]
    collapsed = any(signs)
    return ("yes" if claim else "no", collapsed == claim, ", ".join(figure))


def _pm(stat: tuple[float, float] | None, fmt: str = ".3g") -> str:
    return "n/a" if stat is None else f"{stat[0]:{fmt}} ± {stat[1]:{fmt}}"


def _one(value: float | None, fmt: str = ".3g") -> str:
    return "n/a" if value is None else f"{value:{fmt}}"


def table_markdown(result: dict, summary: dict, verdict: dict) -> str:
    cfg, data = result["config"], result["data"]
    budget = f"{cfg['budget_images']} training images seen" if cfg["budget_images"] else f"{cfg['budget_seconds']} s"
    lines = [
        "# Generative families compared, measured",
        "",
        f"Data: {data['source']}, {data['n_train']} training / {data['n_heldout']} held-out images of shape "
        f"{data['shape']}, {cfg['n_bits']}-bit. Budget per run: {budget}. Seeds: {cfg['seeds']}. "
        f"Device: {result['device']}.",
        "",
        f"Feature space: {result['feature_space']}.",
        "",
    ]
    lines += [f"**Note:** {n}" for n in result["notes"]] + ([""] if result["notes"] else [])
    lines += [
        "Mean ± std over seeds. Quality: FD (lower is better); P/R = precision/recall (k=3), D/C = density/coverage "
        "(k=5). Mode collapse: share of modes covered, KL(generated || real label histogram, +0.5 pseudo-counts), "
        "mean pairwise feature distance relative to real images. Stability: seeds diverged (non-finite loss, or FD "
        f">= {cfg['diverged_fd_ratio']:g} x the uniform-noise FD: no better than noise), FD std over seeds, and loss "
        "roughness (std of the step-to-step loss change / std of the loss; 0 smooth, 1.41 pure noise). Speed: "
        f"median ms per image at batch {cfg['speed_batch']}, network evaluations per image.",
        "",
        "| family | quality | stability | speed | mode collapse | likelihood |",
        "|---|---|---|---|---|---|",
    ]
    for name, ref in result["references"].items():
        lines.append(f"| *{name}* | {_quality_cell(ref)} | - | - | {_mode_cell(ref)} | - |")
    for f, s in summary.items():
        quality = "no finite samples" if s["fd"] is None else _quality_cell(_means(s), s)
        if s["nan_seeds"]:
            quality += f"; NaN samples in {s['nan_seeds']}/{s['n_seeds']} seeds (unscored)"
        stability = f"{s['diverged']}/{s['n_seeds']} diverged; FD std {_one(s['fd'] and s['fd'][1])}; roughness {_pm(s['loss_roughness'], '.2f')}"
        speed = f"{_pm(s['ms_per_image'])} ms/img; {_one(s['evals_per_sample'] and s['evals_per_sample'][0], '.4g')} NFE/img"
        mode = _mode_cell(_means(s))
        kind = s["likelihood"]
        like = "none" if kind == "none" else f"{_pm(s['bits_per_dim'])} bits/dim ({kind})"
        lines.append(f"| {f} | {quality} | {stability} | {speed} | {mode} | {like} |")
    lines += [
        "",
        "## Common wisdom against the measurement",
        "",
        "| family | " + " | ".join(next(iter(verdict.values()))) + " |",
    ]
    lines.append("|---" * (1 + len(next(iter(verdict.values())))) + "|")
    for f, v in verdict.items():
        cells = []
        for claim, agrees, figure in v.values():
            word = "n/a" if agrees is None else ("**agrees**" if agrees else "**contradicts**")
            cells.append(f"claim: {claim} — {word} ({figure})")
        lines.append(f"| {f} | " + " | ".join(cells) + " |")
    lines += ["", "Verdict rules:", "", RULES]
    return "\n".join(lines)


def _means(s: dict) -> dict:
    return {k: v[0] for k, v in s.items() if isinstance(v, tuple)}


def _quality_cell(r: dict, s: dict | None = None) -> str:
    fd = _pm(s["fd"]) if s else _one(r.get("fd"))
    return f"FD {fd}; P {_one(r.get('precision'), '.2f')} R {_one(r.get('recall'), '.2f')} D {_one(r.get('density'), '.2f')} C {_one(r.get('coverage'), '.2f')}"


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

    x_key = "images_seen" if result["config"]["budget_images"] else "seconds"
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
    ax.barh(timed, [summary[f]["ms_per_image"][0] for f in timed], xerr=[summary[f]["ms_per_image"][1] for f in timed])
    for i, f in enumerate(timed):
        ax.text(
            summary[f]["ms_per_image"][0], i, f" {summary[f]['evals_per_sample'][0]:.4g} NFE", va="center", fontsize=7
        )
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
        f: {a: {"claim": c, "agrees": ok, "measured": m} for a, (c, ok, m) in v.items()} for f, v in verdict.items()
    }
    (out / "table.md").write_text(table_markdown(result, summary, verdict))
    (out / "table.json").write_text(json.dumps(result, indent=1))
    for family, x in grids.items():
        save_grid(x, out / f"samples_{family}.png")
    write_plots(out, result, summary)
