"""A chi-square goodness-of-fit check for the statistical tests (no scipy here)."""

from __future__ import annotations

import math

import numpy as np


def chi_square_quantile(df: int, z: float = 3.09) -> float:
    """Wilson-Hilferty approximation of the chi-square quantile at the normal quantile z (3.09: 99.9%)."""
    a = 2.0 / (9.0 * df)
    return df * (1.0 - a + z * math.sqrt(a)) ** 3


def chi_square(counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0) -> tuple[float, int]:
    """(statistic, degrees of freedom) of observed counts against probabilities; sparse cells are pooled."""
    counts = np.asarray(counts, dtype=np.float64)
    expected = np.asarray(probs, dtype=np.float64) * counts.sum()
    big = expected >= min_expected
    obs = list(counts[big]) + [counts[~big].sum()]
    exp = list(expected[big]) + [expected[~big].sum()]
    if exp[-1] < min_expected:  # the pooled rest is too small to be its own cell: fold it into the largest
        obs[int(np.argmax(exp[:-1]))] += obs.pop()
        exp[int(np.argmax(exp[:-1]))] += exp.pop()
    stat = sum((o - e) ** 2 / e for o, e in zip(obs, exp))
    return stat, len(obs) - 1


def assert_distributed_as(counts: np.ndarray, probs: np.ndarray) -> None:
    """Fail when the counts reject `probs` at the 0.1% level (fixed seeds keep the test deterministic)."""
    stat, df = chi_square(counts, probs)
    limit = chi_square_quantile(df)
    assert stat < limit, f"chi-square {stat:.1f} >= {limit:.1f} (df {df}): counts do not follow the distribution"
