"""Statistics shared by the benchmarks: a distribution-free interval for a median of paired ratios."""

from __future__ import annotations

import statistics


def median_ci(ratios: list[float], level: float = 0.9) -> tuple[float, float, float]:
    """(median, low, high): a distribution-free ``level`` interval for the median from order statistics."""
    from scipy.stats import binom

    x, n = sorted(ratios), len(ratios)
    j = 0  # (x[j], x[n-1-j]) misses the median with probability 2 P(Bin(n, 1/2) <= j)
    while j + 1 < n - 1 - (j + 1) and 2 * binom.cdf(j + 1, n, 0.5) <= 1 - level:
        j += 1
    return statistics.median(x), x[j], x[n - 1 - j]
