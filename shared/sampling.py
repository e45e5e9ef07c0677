"""Token choice from logits, shared by edge and cloud so both sample the same way.

Randomness comes in as a uniform draw `u` chosen by the edge: the cloud stays stateless and a seeded
generation is reproducible whichever side picks a token.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max()
    e = np.exp(z)
    return e / e.sum()


def pick_token(logits: np.ndarray, params: SamplingParams, u: float = 0.0) -> int:
    """Greedy argmax, or inverse-CDF sampling with draw `u` in [0, 1) after temperature and top-p."""
    if params.greedy:
        return int(np.argmax(logits))
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        scaled = logits / params.temperature
    if not np.isfinite(scaled).all():  # a temperature so small the logits overflow: that is greedy
        return int(np.argmax(logits))
    probs = softmax(scaled)
    order = np.argsort(-probs, kind="stable")
    sorted_probs = probs[order]
    cum = np.cumsum(sorted_probs)
    keep = int(np.searchsorted(cum, params.top_p) + 1)
    kept = sorted_probs[:keep] / sorted_probs[:keep].sum()
    index = int(np.searchsorted(np.cumsum(kept), u, side="right"))
    return int(order[min(index, keep - 1)])
