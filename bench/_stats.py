"""Means and standard errors over seeds, as the bench tables print them (bench/budget.py, bench/transfer.py)."""

from __future__ import annotations

import math
import statistics


def mean_se(xs: list[float]) -> tuple[float, float | None]:
    """The mean and its standard error (None for one value)."""
    m = statistics.fmean(xs)
    return m, (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else None)


def ms(xs: list[float]) -> str:
    """``mean ± s.e.`` with two decimals, or the mean alone for one value."""
    m, se = mean_se(xs)
    return f"{m:.2f}" if se is None else f"{m:.2f} ± {se:.2f}"
