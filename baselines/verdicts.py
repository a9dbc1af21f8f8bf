"""What the comparison concludes, with its uncertainty: every figure as a mean and a 95% interval over seeds, and for
each family and aspect whether the measurement agrees with the common-wisdom claim, contradicts it, is inconclusive
(the interval straddles the rule's threshold) or gives no evidence (the family's samples are no better than noise).

Intervals are Student's t intervals for the mean over seeds (scipy.stats.t), and for the FD spread a chi-square
interval for the standard deviation; both assume the seeds' figures are roughly normal. With one seed there is no
interval, and every verdict that needs one is inconclusive.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

CONFIDENCE = 0.95
OUTCOMES = ("agrees", "contradicts", "inconclusive", "no evidence", "n/a")

# The common wisdom this comparison answers: quality out of 10, stability, speed, collapse, likelihood.
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
Every figure is a mean over seeds with its {CONFIDENCE:.0%} t-interval; a rule whose threshold lies inside the interval
gives **inconclusive**. A family whose samples are no better than noise (mean FD >= `diverged_fd_ratio` x the
uniform-noise FD and mean precision within a tenth of the way from noise's to the real data's), or with no finite
samples, gives **no evidence** on quality, stability and mode collapse: a broken run says nothing about its family.
Its speed and likelihood kind do not depend on what it learned and are still judged.
- Quality: claims are grouped in tiers (>= 9/10, 7-8/10, 6/10); a family agrees when every rank its FD interval allows
  (1 = best; another family is surely better only when their intervals do not overlap) falls in the ranks its tier
  would hold among the families with evidence, contradicts when none does.
- Stability: measured unstable when any seed diverged, or when the {CONFIDENCE:.0%} chi-square interval of the seeds'
  FD spread (std / mean) lies above the config's `unstable_cv`; stable when it lies below. With 3 seeds the interval
  runs from about 0.5x to 6x the measured spread, so only a very tight spread shows stability.
- Speed: fast = at most {FAST_RATIO:g}x the fastest family's mean ms/image at the speed batch (the fastest of several
  timed batches per seed: load on the machine only ever adds time), slow above; "very slow" agrees when slow and
  surely slower than every family claimed "slow". The flow's "fast" is not in the common-wisdom list; it is the
  expectation of one inverse pass.
- Mode collapse: collapsed when one of these lies wholly past its threshold: modes covered < 0.9 x the real-data row's,
  KL(generated || real) > the real-data row's + 0.5 nats, pairwise-distance ratio < 0.5; not collapsed when all lie
  wholly on the healthy side.
- Likelihood: the kind the model computes (exact, bound = approximate, none), with its held-out bits/dim.
"""


NOISE_PRECISION_SHARE = 0.1  # "no better than noise": precision within this share of the way from noise's to real's


def no_better_than_noise(fd: float | None, precision: float | None, references: dict, fd_ratio: float) -> bool:
    """Samples no better than uniform noise: no finite samples, or an FD at least `fd_ratio` x noise's *and* a
    precision (the share of samples inside the real images' k-NN balls) within a tenth of the way from noise's to
    the real data's. FD alone misjudged samples that sit far from every training image in the classifier's features:
    at 32 px a briefly trained DDPM's blurred shapes had an FD above noise's with precision 0.47 (noise: 0.00)."""
    if fd is None or not math.isfinite(fd):
        return True
    noise, real = references["uniform noise"], references["real data"]
    if fd < fd_ratio * noise["fd"]:
        return False
    if precision is None or "precision" not in noise:
        return True
    return precision <= noise["precision"] + NOISE_PRECISION_SHARE * (real["precision"] - noise["precision"])


def run_diverged(record: dict, references: dict, fd_ratio: float) -> bool:
    """A run diverged when its loss went non-finite or its samples are no better than noise."""
    return bool(record.get("loss_diverged")) or no_better_than_noise(
        record.get("fd"), record.get("precision"), references, fd_ratio
    )


def interval(values: list) -> dict | None:
    """Mean, std and the t-interval (lo, hi) over the finite values; lo/hi are infinite with fewer than two."""
    vals = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if len(vals) == 0:
        return None
    mean = float(vals.mean())
    if len(vals) < 2:
        return {"mean": mean, "std": 0.0, "lo": -math.inf, "hi": math.inf, "n": 1}
    std = float(vals.std(ddof=1))
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, len(vals) - 1)) * std / math.sqrt(len(vals))
    return {"mean": mean, "std": std, "lo": mean - half, "hi": mean + half, "n": len(vals)}


def cv_interval(stat: dict | None) -> tuple[float, float, float] | None:
    """(cv, lo, hi): the spread std / mean with a chi-square interval for the std (normal seeds)."""
    if stat is None or stat["mean"] <= 0:
        return None
    n, cv = stat["n"], stat["std"] / stat["mean"]
    if n < 2:
        return cv, 0.0, math.inf
    lo = cv * math.sqrt((n - 1) / stats.chi2.ppf(0.5 + CONFIDENCE / 2, n - 1))
    hi = cv * math.sqrt((n - 1) / stats.chi2.ppf(0.5 - CONFIDENCE / 2, n - 1))
    return cv, lo, hi


def side(stat: dict, threshold: float) -> int:
    """-1: the interval lies below the threshold, +1: above, 0: it straddles (inconclusive)."""
    return -1 if stat["hi"] < threshold else 1 if stat["lo"] > threshold else 0


def summarise(result: dict) -> dict[str, dict]:
    """Per family: an `interval` of every figure over seeds, diverged counts, and what the verdicts need."""
    keys = ("fd", "precision", "recall", "density", "coverage", "modes_covered", "kl_generated_real")
    keys += ("pairwise_ratio", "ms_per_image", "evals_per_sample", "bits_per_dim", "loss_roughness")
    keys += ("steps", "images_seen", "train_seconds", "run_seconds")
    references, fd_ratio = result["references"], result["config"]["diverged_fd_ratio"]
    summary = {}
    for family in dict.fromkeys(r["family"] for r in result["runs"]):
        runs = [r for r in result["runs"] if r["family"] == family]
        s = {k: interval([r.get(k) for r in runs]) for k in keys}
        s["n_seeds"], s["diverged"] = len(runs), sum(r["diverged"] for r in runs)
        s["nan_seeds"] = sum(r.get("non_finite_samples", 0) > 0 for r in runs)  # runs whose samples held NaN
        s["likelihood"] = runs[0]["likelihood"]
        s["fd_cv"] = cv_interval(s["fd"])
        mean = {k: s[k] and s[k]["mean"] for k in ("fd", "precision")}
        s["evidence"] = not no_better_than_noise(mean["fd"], mean["precision"], references, fd_ratio)
        summary[family] = s
    return summary


def _word(claim_holds: int) -> str:
    """+1: the measurement shows the claim, -1: it shows the opposite, 0: it cannot tell."""
    return {1: "agrees", -1: "contradicts", 0: "inconclusive"}[claim_holds]


def verdicts(summary: dict, result: dict) -> dict[str, dict[str, tuple[str, str, str]]]:
    """family -> aspect -> (claim, outcome (one of OUTCOMES), measured figure)."""
    real = result["references"]["real data"]
    with_evidence = [f for f in summary if summary[f]["evidence"]]
    out = {}
    for f, s in summary.items():
        c, v = CLAIMS[f], {}
        if s["evidence"]:
            v["quality"] = _quality_verdict(f, summary, with_evidence)
            v["stability"] = _stability_verdict(f, s, result["config"]["unstable_cv"])
            v["mode collapse"] = _collapse_verdict(c["collapse"], s, real)
        else:
            why = "no finite samples" if s["fd"] is None else f"FD {ci_text(s['fd'])}: no better than noise"
            v["quality"] = (f"{c['quality']:g}/10", "no evidence", why)
            v["stability"] = (_stable_claim(c), "no evidence", f"{s['diverged']}/{s['n_seeds']} diverged")
            v["mode collapse"] = ("yes" if c["collapse"] else "no", "no evidence", why)
        v["speed"] = _speed_verdict(f, summary)
        kind = LIKELIHOOD_KIND[s["likelihood"]]
        figure = f"{kind}, {ci_text(s['bits_per_dim'])} bits/dim" if s["bits_per_dim"] else kind
        v["likelihood"] = (str(c["likelihood"]), "agrees" if kind == c["likelihood"] else "contradicts", figure)
        out[f] = {k: v[k] for k in ("quality", "stability", "speed", "mode collapse", "likelihood")}
    return out


def _tier(f: str) -> int:
    q = CLAIMS[f]["quality"]
    return 3 if q >= 9 else 2 if q >= 7 else 1


def _quality_verdict(f: str, summary: dict, families: list[str]) -> tuple[str, str, str]:
    fd = summary[f]["fd"]
    surely_better = sum(summary[g]["fd"]["hi"] < fd["lo"] for g in families if g != f)
    surely_worse = sum(summary[g]["fd"]["lo"] > fd["hi"] for g in families if g != f)
    best, worst = 1 + surely_better, len(families) - surely_worse
    lo = 1 + sum(_tier(g) > _tier(f) for g in families)
    hi = sum(_tier(g) >= _tier(f) for g in families)
    holds = 1 if lo <= best and worst <= hi else -1 if worst < lo or best > hi else 0
    ranks = f"{best}" if best == worst else f"{best}-{worst}"
    claim = f"{CLAIMS[f]['quality']:g}/10"
    return claim, _word(holds), f"FD {ci_text(fd)}, rank {ranks}/{len(families)} (tier: {lo}-{hi})"


def _stable_claim(c: dict) -> str:
    return "unstable (3/10)" if not c["stable"] else "stable (8-10/10)"


def _stability_verdict(f: str, s: dict, cv_max: float) -> tuple[str, str, str]:
    claim_stable = CLAIMS[f]["stable"]
    figure = f"{s['diverged']}/{s['n_seeds']} diverged"
    if s["diverged"]:
        measured = 1  # unstable
    elif s["fd_cv"] is None:
        return _stable_claim(CLAIMS[f]), "n/a", figure
    else:
        cv, lo, hi = s["fd_cv"]
        figure += f", FD std/mean {cv:.2f} [{lo:.2f}, {_num(hi, '.2f')}]"
        measured = 1 if lo > cv_max else -1 if hi <= cv_max else 0
    holds = 0 if measured == 0 else (1 if (measured == 1) != claim_stable else -1)
    return _stable_claim(CLAIMS[f]), _word(holds), figure


def _speed_verdict(f: str, summary: dict) -> tuple[str, str, str]:
    claim, ms = CLAIMS[f]["speed"], summary[f]["ms_per_image"]
    timed = [s["ms_per_image"]["mean"] for s in summary.values() if s["ms_per_image"]]
    if ms is None or not timed:
        return (claim, "n/a", "not measured")
    fastest = min(timed)
    measured = side({"lo": ms["lo"] / fastest, "hi": ms["hi"] / fastest}, FAST_RATIO)  # +1 slow, -1 fast
    if claim == "fast":
        holds = -measured
    elif claim == "slow":
        holds = measured
    else:  # very slow: slow, and surely slower than every family claimed slow
        others = [
            summary[g]["ms_per_image"] for g in summary if CLAIMS[g]["speed"] == "slow" and summary[g]["ms_per_image"]
        ]
        slower = [1 if ms["lo"] > o["hi"] else -1 if ms["hi"] < o["lo"] else 0 for o in others]
        holds = min([measured, *slower])
    return claim, _word(holds), f"{ci_text(ms)} ms/image ({ms['mean'] / fastest:.3g}x fastest)"


def _collapse_verdict(claim: bool, s: dict, real: dict) -> tuple[str, str, str]:
    claim_word = "yes" if claim else "no"
    if s["pairwise_ratio"] is None:
        return claim_word, "n/a", "not measured"
    signs = [-side(s["pairwise_ratio"], 0.5)]  # +1: collapsed, -1: healthy, 0: cannot tell
    figure = [f"pairwise ratio {ci_text(s['pairwise_ratio'], '.2f')}"]
    if s["modes_covered"] is not None and "modes_covered" in real:
        signs.append(-side(s["modes_covered"], 0.9 * real["modes_covered"]))
        signs.append(side(s["kl_generated_real"], real["kl_generated_real"] + 0.5))
        figure[:0] = [f"modes {ci_text(s['modes_covered'], '.2f')}", f"KL {ci_text(s['kl_generated_real'], '.2f')}"]
    measured = 1 if max(signs) == 1 else -1 if all(x == -1 for x in signs) else 0
    holds = 0 if measured == 0 else (1 if (measured == 1) == claim else -1)
    return claim_word, _word(holds), ", ".join(figure)


def _num(x: float, fmt: str = ".3g") -> str:
    return "∞" if x == math.inf else "-∞" if x == -math.inf else f"{x:{fmt}}"


def ci_text(stat: dict | None, fmt: str = ".3g") -> str:
    """`mean [lo, hi]`: the mean and its interval, as the tables print them."""
    if stat is None:
        return "n/a"
    if stat["n"] < 2:
        return f"{stat['mean']:{fmt}} (1 seed)"
    return f"{stat['mean']:{fmt}} [{_num(stat['lo'], fmt)}, {_num(stat['hi'], fmt)}]"
