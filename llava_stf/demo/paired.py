"""Paired differences over seeds with a Student-t confidence interval (the projector comparison's Δ column).

Each seed trains every projector from the same LLM initialisation and data order, so runs of one seed are paired:
the difference of two projectors is taken per seed, and its mean over seeds gets a two-sided t interval with
``n - 1`` degrees of freedom (the textbook paired t interval). No SciPy: the t quantile comes from the t density,
integrated with Simpson's rule and inverted by bisection (accurate to ~1e-6 for the small ``df`` used here).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from functools import lru_cache


def t_cdf(x: float, df: int, intervals: int = 4000) -> float:
    """P(T <= x) for Student's t with ``df`` degrees of freedom (Simpson's rule on the density from 0 to ``|x|``)."""
    if df < 1:
        raise ValueError(f"t_cdf: df must be at least 1, got {df}")
    norm = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi)

    def density(t: float) -> float:
        return norm * (1 + t * t / df) ** (-(df + 1) / 2)

    h = abs(x) / intervals
    area = density(0.0) + density(abs(x))
    area += sum((4 if i % 2 else 2) * density(i * h) for i in range(1, intervals))
    half = area * h / 3
    return 0.5 + half if x >= 0 else 0.5 - half


@lru_cache(maxsize=64)  # every row of a comparison asks for the same quantile
def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``0.5 < p < 1``), by bisection on ``t_cdf``."""
    if not 0.5 < p < 1:
        raise ValueError(f"t_quantile: p must lie in (0.5, 1), got {p}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


@dataclass(frozen=True)
class PairedDifference:
    """Mean of per-seed differences ``a - b`` and its two-sided confidence interval (``None`` with one seed)."""

    mean: float
    low: float | None
    high: float | None
    seeds: int


def paired_difference(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> PairedDifference | None:
    """``a`` against ``b``, both ``{seed: value}``, over the seeds they share (``None`` when they share none)."""
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return PairedDifference(mean, None, None, 1)
    half = t_quantile(0.5 + level / 2, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return PairedDifference(mean, mean - half, mean + half, len(diffs))


__all__ = ["PairedDifference", "paired_difference", "t_cdf", "t_quantile"]
