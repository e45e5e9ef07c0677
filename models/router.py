"""Calibrating exit rules (`offramp calibrate`): fit the logistic router and pick the threshold for a target agreement.

The rule itself (`ExitRule`, its features, its file) lives in `offramp.shared.exit_rule`, which the edge reads
without torch; this module only fits it.
"""

from __future__ import annotations

import math

import numpy as np

from offramp.shared.errors import SplitConfigError
from offramp.shared.exit_rule import NEVER, ExitRule


def fit_logistic(features: np.ndarray, labels: np.ndarray, l2: float = 1e-3, iters: int = 50) -> ExitRule:
    """The logistic exit rule over the edge's logit features (`offramp.shared.exit_rule.FEATURES`)."""
    w, bias, mean, scale = fit_logistic_weights(features, labels, l2, iters)
    return ExitRule(kind="logistic", weights=w.tolist(), bias=bias, mean=mean.tolist(), scale=scale.tolist())


def logistic_confidence(features: np.ndarray, fitted: tuple[np.ndarray, float, np.ndarray, np.ndarray]) -> np.ndarray:
    """P(agree) under weights from `fit_logistic_weights`, for any feature set (studies of candidate signals)."""
    w, bias, mean, scale = fitted
    x = (np.asarray(features, dtype=np.float64) - mean) / scale
    return 1.0 / (1.0 + np.exp(-np.clip(x @ w + bias, -50, 50)))


def fit_logistic_weights(
    features: np.ndarray, labels: np.ndarray, l2: float = 1e-3, iters: int = 50
) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Newton-IRLS logistic regression of `labels` (edge agrees) on standardised features; deterministic.
    Returns (weights, bias, mean, scale)."""
    f = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    if len(y) == 0 or y.min() == y.max():
        raise SplitConfigError(f"cannot fit a router on {len(y)} positions with a single label value")
    mean, scale = f.mean(0), f.std(0) + 1e-9
    x = np.concatenate([(f - mean) / scale, np.ones((len(f), 1))], axis=1)
    w = np.zeros(x.shape[1])
    reg = l2 * len(y) * np.eye(x.shape[1])
    reg[-1, -1] = 0.0
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(x @ w, -30, 30)))
        grad = x.T @ (p - y) + reg @ w
        hess = (x * (p * (1 - p))[:, None]).T @ x + reg + 1e-9 * np.eye(x.shape[1])
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return w[:-1], float(w[-1]), mean, scale


def _exit_cuts(confidence: np.ndarray, agree: np.ndarray, target: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions by falling confidence: (confidences, wrong exits if the first i+1 exit, whether cutting after i
    is a valid threshold: ties exit together). Checks the target and that there is something to calibrate on."""
    if not 0.0 < target <= 1.0:
        raise SplitConfigError(f"target agreement {target!r} must be in (0, 1]")
    c = np.asarray(confidence, dtype=np.float64)
    if len(c) == 0:
        raise SplitConfigError("cannot calibrate on zero positions")
    order = np.argsort(-c, kind="stable")
    c_sorted, wrong = c[order], np.cumsum(~np.asarray(agree, dtype=bool)[order])
    return c_sorted, wrong, np.r_[c_sorted[1:] != c_sorted[:-1], True]


def pick_threshold(confidence: np.ndarray, agree: np.ndarray, target: float) -> tuple[float, float, float]:
    """The lowest threshold whose collaborative agreement (edge token if it exits, else the full model's) >= target.

    Returns (threshold, exit_rate, agreement). Exiting at confidence >= t; ties exit together, so only thresholds
    at distinct confidence values are candidates. NEVER (no exits, agreement 1.0) if nothing meets the target.
    """
    c_sorted, wrong, last_of_value = _exit_cuts(confidence, agree, target)
    n = len(c_sorted)
    agreement = 1.0 - wrong / n
    ok = last_of_value & (agreement >= target)
    if not ok.any():
        return NEVER, 0.0, 1.0
    i = int(np.nonzero(ok)[0].max())
    return float(c_sorted[i]), (i + 1) / n, float(agreement[i])


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(X <= k) for X ~ Binomial(n, p), summed in log space (exact enough for n up to millions, k small)."""
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    lp, lq = math.log(p), math.log1p(-p)
    terms = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * lp + (n - i) * lq for i in range(k + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


def clopper_pearson_upper(errors: int, n: int, level: float = 0.95) -> float:
    """One-sided Clopper-Pearson upper bound on an error rate after `errors` in `n` trials: the p at which seeing
    `errors` or fewer has probability 1 - level (bisection on the exact binomial tail; no scipy on the edge side)."""
    if not 0.0 < level < 1.0:
        raise SplitConfigError(f"confidence level {level!r} must be in (0, 1)")
    if n <= 0:
        raise SplitConfigError(f"a bound needs at least one trial, got n={n}")
    if errors >= n:
        return 1.0
    alpha = 1.0 - level
    lo, hi = errors / n, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if binomial_cdf(errors, n, mid) > alpha:
            lo = mid
        else:
            hi = mid
    return hi


def certified_threshold(confidence: np.ndarray, agree: np.ndarray, target: float,
                        level: float = 0.95) -> tuple[float, float, float, float]:
    """The lowest threshold whose collaborative agreement has a one-sided `level` Clopper-Pearson lower bound >=
    target. Returns (threshold, exit_rate, observed agreement, lower bound); NEVER (no exits, bound 1.0) if none.

    A position disagrees only when its draft exits and is wrong; with n positions fixed the bound depends on the
    number of such errors alone, so the answer is the lowest cut with at most the largest certifiable error count.
    Positions of one text are not independent draws, so the bound is optimistic by the text's correlation.
    """
    c_sorted, wrong, last_of_value = _exit_cuts(confidence, agree, target)
    n = len(c_sorted)
    # The largest error count whose bound meets the target (the bound falls as errors grow; none above the point
    # estimate's (1 - target) * n can meet it).
    lo, hi = -1, min(n - 1, int((1.0 - target) * n))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if 1.0 - clopper_pearson_upper(mid, n, level) >= target:
            lo = mid
        else:
            hi = mid - 1
    allowed = lo
    if allowed < 0:
        return NEVER, 0.0, 1.0, 1.0  # nothing exits: every token is the full model's
    ok = last_of_value & (wrong <= allowed)
    if not ok.any():
        return NEVER, 0.0, 1.0, 1.0  # nothing exits: every token is the full model's
    i = int(np.nonzero(ok)[0].max())
    errors = int(wrong[i])
    return float(c_sorted[i]), (i + 1) / n, 1.0 - errors / n, 1.0 - clopper_pearson_upper(errors, n, level)
