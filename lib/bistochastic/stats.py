"""Effect sizes with intervals over seeds, and equivalence tests: how the book states a verdict.

Every verdict in the book is an effect size (a mean, or a mean paired difference, over seeds) with a
confidence interval, and -- for "no better than" claims -- an equivalence test (TOST) with a margin
fixed before the run. These helpers are the one implementation the chapters use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np

__all__ = ["Interval", "mean_ci", "paired_ci", "TOSTResult", "tost", "first_crossing"]

ArrayLike = Union[Sequence[float], np.ndarray]


@dataclass(frozen=True)
class Interval:
    """A mean with its two-sided confidence interval over ``n`` independent replicates (seeds)."""

    mean: float
    lo: float
    hi: float
    n: int
    level: float

    def excludes(self, value: float = 0.0) -> bool:
        """True when ``value`` lies outside the interval (the effect's sign is resolved)."""
        return not (self.lo <= value <= self.hi)

    def fmt(self, sig: int = 3) -> str:
        """``"+0.078 [0.050, 0.105]"`` at ``sig`` significant digits (machine-independent text)."""
        from .book import round_sig

        m, lo, hi = (round_sig(float(v), sig) for v in (self.mean, self.lo, self.hi))
        return f"{m:+.{sig}g} [{lo:.{sig}g}, {hi:.{sig}g}]"


def _as_1d(x: ArrayLike, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size < 2:
        raise ValueError(f"{name}: need at least 2 replicates, got {a.size}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains non-finite values")
    return a


def mean_ci(x: ArrayLike, level: float = 0.95) -> Interval:
    """Student-t confidence interval for the mean of ``x`` (shape ``(n,)``, one value per seed)."""
    from scipy import stats

    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    a = _as_1d(x, "x")
    n = a.size
    m = float(a.mean())
    se = float(a.std(ddof=1)) / np.sqrt(n)
    h = float(stats.t.ppf(0.5 + level / 2.0, n - 1)) * se
    return Interval(mean=m, lo=m - h, hi=m + h, n=n, level=level)


def paired_ci(x: ArrayLike, y: ArrayLike, level: float = 0.95) -> Interval:
    """Interval for the mean paired difference ``x - y`` (same seeds, shape ``(n,)`` each)."""
    a, b = _as_1d(x, "x"), _as_1d(y, "y")
    if a.shape != b.shape:
        raise ValueError(f"x and y must pair up: shapes {a.shape} and {b.shape}")
    return mean_ci(a - b, level)


@dataclass(frozen=True)
class TOSTResult:
    """Two one-sided tests for equivalence of ``x`` and ``y`` within ``±margin``.

    ``p`` is the larger of the two one-sided p-values; ``equivalent`` is ``p < alpha``, which is the
    same as the ``1 - 2 alpha`` interval of the difference lying inside ``(-margin, margin)``.
    """

    diff: Interval
    margin: float
    alpha: float
    p: float

    @property
    def equivalent(self) -> bool:
        return self.p < self.alpha


def tost(x: ArrayLike, y: ArrayLike, margin: float, alpha: float = 0.05,
         paired: bool = True) -> TOSTResult:
    """Equivalence test of the means of ``x`` and ``y`` (shape ``(n,)``) within ``±margin``.

    Paired (default): on the per-seed differences. Unpaired: Welch's two one-sided t tests. The
    margin is the largest difference that counts as "no better" and must be chosen before the run.
    """
    from scipy import stats

    if not (isinstance(margin, (int, float)) and np.isfinite(margin) and margin > 0):
        raise ValueError(f"margin must be a positive finite number, got {margin!r}")
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), got {alpha!r}")
    a, b = _as_1d(x, "x"), _as_1d(y, "y")
    if paired:
        if a.shape != b.shape:
            raise ValueError(f"x and y must pair up: shapes {a.shape} and {b.shape}")
        d = a - b
        n = d.size
        m, se, df = float(d.mean()), float(d.std(ddof=1)) / np.sqrt(n), n - 1
    else:
        va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
        m = float(a.mean() - b.mean())
        se = float(np.sqrt(va + vb))
        df = float((va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))) if se > 0 else 1.0
    if se == 0.0:
        p = 0.0 if abs(m) < margin else 1.0
    else:
        p_lo = 1.0 - float(stats.t.cdf((m + margin) / se, df))   # H0: diff <= -margin
        p_hi = float(stats.t.cdf((m - margin) / se, df))         # H0: diff >= +margin
        p = max(p_lo, p_hi)
    h = float(stats.t.ppf(1.0 - alpha, df)) * se
    n_eff = int(a.size)
    diff = Interval(mean=m, lo=m - h, hi=m + h, n=n_eff, level=1.0 - 2.0 * alpha)
    return TOSTResult(diff=diff, margin=float(margin), alpha=float(alpha), p=float(p))


def first_crossing(x: ArrayLike, y: ArrayLike, level: float, *, direction: str = "up",
                   log_x: bool = True, stay: bool = False) -> float:
    """The first ``x`` at which the curve ``y(x)`` passes ``level``, interpolated.

    How the book locates a threshold from a sweep (a critical temperature, a margin) instead of
    reading it off a coarse grid.

    Parameters
    ----------
    x : (K,) increasing sweep points (positive when ``log_x``).
    y : (K,) the measured curve at ``x`` (one seed; call once per seed and put an interval over
        the seeds' crossings).
    level : the level, fixed before the sweep is run.
    direction : ``"up"`` (first rise above ``level``) or ``"down"`` (first fall below it).
    log_x : interpolate linearly in ``log x`` (a log-spaced sweep) rather than in ``x``.
    stay : the crossing after which ``y`` stays past ``level`` at every larger sweep point (a
        threshold beyond which the effect persists; an excursion followed by a return does not
        count).

    Returns
    -------
    The interpolated crossing between the last sweep point not past ``level`` and the first one
    past it; ``x[0]`` if the curve is past ``level`` from the first point on (left-censored) and
    ``inf`` if it does not end past it (right-censored: the crossing, if any, lies beyond
    ``x[-1]``).
    """
    if direction not in ("up", "down"):
        raise ValueError(f"direction: expected 'up' or 'down', got {direction!r}")
    xa, ya = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if xa.ndim != 1 or xa.shape != ya.shape or xa.size < 2:
        raise ValueError("x, y: expected 1-D sequences of equal length >= 2")
    if not np.all(np.diff(xa) > 0) or (log_x and xa[0] <= 0):
        raise ValueError("x: expected increasing sweep points (positive with log_x)")
    if not np.isfinite(ya).all():
        raise ValueError("y: expected finite values")
    if not math.isfinite(level):
        raise ValueError(f"level: expected a finite number, got {level!r}")
    if direction == "down":
        ya, level = -ya, -level
    if stay:
        below = np.nonzero(ya <= level)[0]
        if below.size == 0:
            return float(xa[0])
        k = int(below[-1]) + 1
        if k == xa.size:
            return math.inf
    else:
        above = np.nonzero(ya > level)[0]
        if above.size == 0:
            return math.inf
        k = int(above[0])
    if k == 0:
        return float(xa[0])
    u = np.log(xa) if log_x else xa
    t = (level - ya[k - 1]) / (ya[k] - ya[k - 1])
    v = u[k - 1] + t * (u[k] - u[k - 1])
    return float(np.exp(v) if log_x else v)
