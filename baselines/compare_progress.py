"""The comparison's progress line: which run and which phase (training, sampling, scoring, bits/dim), and the time
left for everything still to do, evaluation included.

The estimate is built from what this invocation has measured. A family with a finished run costs what its finished
runs cost (training and evaluation, averaged). The run in progress extrapolates its training from the share of the
budget spent, and its evaluation from its own intermediate quality points (seconds per sample drawn and scored) or,
before it has any, from the evaluation-to-training ratio of the families already finished. A family not yet started
costs the mean of the runs finished so far. The comparison runs seed-major (every family's seed 0, then seed 1, ...),
so after the first round every family has been measured and the estimate covers all that remains.

Sampling a batch can take a minute (PixelCNN's one pass per row band), and tqdm redraws only when told, so a daemon
thread redraws the line every few seconds: the clock and the time left keep moving through long phases.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from functools import wraps

from tqdm.auto import tqdm


def _locked(method):
    """The redraw thread reads what the events write: one lock serialises them."""

    @wraps(method)
    def run(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)

    return run


class Progress:
    REDRAW_SECONDS = 5.0  # the redraw thread's period
    STEP_REDRAW_SECONDS = 0.2  # training steps redraw the line at most this often (a step can take milliseconds)

    def __init__(
        self,
        runs: list[tuple[str, int]],
        done: set[tuple[str, int]],
        samples_per_run: int,
        clock: Callable[[], float] = time.monotonic,
        disable: bool = False,
    ):
        self.pending = [r for r in runs if r not in done]
        self.samples_per_run, self.clock = samples_per_run, clock  # samples drawn and scored in one run
        self.finished: dict[str, list[tuple[float, float]]] = {}  # family -> [(train s, eval s)]
        self.eval_rate: dict[str, float] = {}  # family -> eval seconds per sample, from intermediate points
        self.current: tuple[str, int] | None = None
        self.phase, self.fraction, self.step = "", 0.0, 0
        self.run_start = self.train_end = self.paused = 0.0  # paused: quality points measured between chunks
        fmt = "{desc} {n:.1f}/{total} runs |{bar}| {elapsed} elapsed{postfix}"  # tqdm puts ", " before the postfix
        self.bar = tqdm(
            total=len(runs), initial=len(runs) - len(self.pending), bar_format=fmt, disable=disable, dynamic_ncols=True
        )
        self.done_count = len(runs) - len(self.pending)
        self.lock, self.closed, self.drawn_at = threading.RLock(), threading.Event(), 0.0
        if not disable:
            threading.Thread(target=self._redraw, name="compare-progress", daemon=True).start()

    def _redraw(self) -> None:
        while not self.closed.wait(self.REDRAW_SECONDS):
            self._show()

    # ------------------------------------------------------------------------------------------- events

    @_locked
    def start(self, family: str, seed: int) -> None:
        self.current, self.phase, self.fraction, self.step = (family, seed), "training", 0.0, 0
        self.run_start, self.paused = self.clock(), 0.0
        self._show()

    @_locked
    def training(self, fraction: float, step: int) -> None:
        self.fraction, self.step = min(max(fraction, 0.0), 1.0), step
        if time.monotonic() - self.drawn_at >= self.STEP_REDRAW_SECONDS:
            self._show()

    @_locked
    def set_phase(self, phase: str) -> None:
        """ "training" again after a "quality point" goes on training; any other phase is evaluation."""
        now = self.clock()
        if self.phase == "training" and phase != "training":
            self.train_end = now
        if self.phase == "quality point" and phase == "training":
            self.paused += now - self.train_end
        self.phase = phase
        self._show()

    @_locked
    def measured_eval(self, seconds: float, n_samples: int) -> None:
        """An intermediate quality point of the current run: `seconds` to draw and score `n_samples`."""
        self.eval_rate[self.current[0]] = seconds / max(n_samples, 1)

    @_locked
    def finish(self) -> None:
        family = self.current[0]
        now = self.clock()
        train_end = self.train_end if self.phase != "training" else now
        train = train_end - self.run_start - self.paused
        self.finished.setdefault(family, []).append((train, now - self.run_start - train))
        self.pending.remove(self.current)
        self.current, self.done_count = None, self.done_count + 1
        self.bar.n = self.done_count
        self._show()

    @_locked
    def write(self, text: str) -> None:
        self.bar.write(text)

    @_locked
    def close(self) -> None:
        self.closed.set()
        self.bar.close()

    # ------------------------------------------------------------------------------------------- the estimate

    def _mean_finished(self, family: str) -> tuple[float, float] | None:
        runs = self.finished.get(family)
        if not runs:
            return None
        return sum(t for t, _ in runs) / len(runs), sum(e for _, e in runs) / len(runs)

    def _eval_estimate(self, family: str, train_seconds: float) -> float | None:
        if family in self.eval_rate:
            return self.eval_rate[family] * self.samples_per_run
        ratios = [e / t for runs in self.finished.values() for t, e in runs if t > 0]
        return train_seconds * sum(ratios) / len(ratios) if ratios else None

    def _current_left(self) -> tuple[float | None, float | None]:
        """(seconds left in the current run, its estimated total), or None where nothing is known yet."""
        family = self.current[0]
        elapsed = self.clock() - self.run_start
        known = self._mean_finished(family)
        if known is not None:
            return max(sum(known) - elapsed, 0.0), sum(known)
        if self.phase == "training":
            if self.fraction <= 0:
                return None, None
            trained = elapsed - self.paused
            train_total = trained / self.fraction
            evaluation = self._eval_estimate(family, train_total)
            if evaluation is None:
                return None, None
            return train_total - trained + max(evaluation - self.paused, 0.0), train_total + evaluation
        train = self.train_end - self.run_start - self.paused
        evaluation = self._eval_estimate(family, train)
        if evaluation is None:
            return None, None
        return max(train + evaluation - elapsed, 0.0), train + evaluation

    def seconds_left(self) -> float | None:
        """Estimated seconds until every pending run is trained and measured; None while nothing is known."""
        left, current_total = (0.0, None) if self.current is None else self._current_left()
        if left is None:
            return None
        totals = [sum(m) for f in self.finished if (m := self._mean_finished(f))]
        fallback = sum(totals) / len(totals) if totals else current_total
        for family, seed in self.pending:
            if (family, seed) == self.current:
                continue
            known = self._mean_finished(family)
            if known is not None:
                left += sum(known)
            elif family == (self.current or ("",))[0] and current_total is not None:
                left += current_total
            elif fallback is not None:
                left += fallback
            else:
                return None
        return left

    @_locked
    def _show(self) -> None:
        if self.closed.is_set():
            return
        self.drawn_at = time.monotonic()
        left = self.seconds_left()
        eta = "time left: unknown until a run is measured" if left is None else f"~{_clock(left)} left (all phases)"
        if self.current is not None:
            family, seed = self.current
            where = f"{family} seed {seed}: {self.phase}" + (f" step {self.step}" if self.phase == "training" else "")
            self.bar.n = self.done_count + (self._share() or 0.0)
            self.bar.set_postfix_str(f"{where}; {eta}", refresh=True)
        else:
            self.bar.set_postfix_str(eta, refresh=True)

    def _share(self) -> float | None:
        left, total = self._current_left()
        if left is None or not total:
            return None
        return min(max(1 - left / total, 0.0), 0.99)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"
