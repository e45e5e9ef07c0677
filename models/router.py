"""Calibrating exit rules (`offramp calibrate`): fit the logistic router and pick the threshold for a target agreement.

The rule itself (`ExitRule`, its features, its file) lives in `offramp.shared.exit_rule`, which the edge reads
without torch; this module only fits it.
"""

from __future__ import annotations

import numpy as np

from offramp.shared.errors import SplitConfigError
from offramp.shared.exit_rule import NEVER, ExitRule


def fit_logistic(features: np.ndarray, labels: np.ndarray, l2: float = 1e-3, iters: int = 50) -> ExitRule:
    """Newton-IRLS logistic regression of `labels` (edge agrees) on standardised features; deterministic."""
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
    return ExitRule(kind="logistic", weights=w[:-1].tolist(), bias=float(w[-1]), mean=mean.tolist(), scale=scale.tolist())


def pick_threshold(confidence: np.ndarray, agree: np.ndarray, target: float) -> tuple[float, float, float]:
    """The lowest threshold whose collaborative agreement (edge token if it exits, else the full model's) >= target.

    Returns (threshold, exit_rate, agreement). Exiting at confidence >= t; ties exit together, so only thresholds
    at distinct confidence values are candidates. NEVER (no exits, agreement 1.0) if nothing meets the target.
    """
    if not 0.0 < target <= 1.0:
        raise SplitConfigError(f"target agreement {target!r} must be in (0, 1]")
    c = np.asarray(confidence, dtype=np.float64)
    a = np.asarray(agree, dtype=bool)
    n = len(c)
    if n == 0:
        raise SplitConfigError("cannot calibrate on zero positions")
    order = np.argsort(-c, kind="stable")
    c_sorted, wrong = c[order], np.cumsum(~a[order])
    last_of_value = np.r_[c_sorted[1:] != c_sorted[:-1], True]  # exiting the first i+1 is a valid cut
    agreement = 1.0 - wrong / n
    ok = last_of_value & (agreement >= target)
    if not ok.any():
        return NEVER, 0.0, 1.0
    i = int(np.nonzero(ok)[0].max())
    return float(c_sorted[i]), (i + 1) / n, float(agreement[i])
