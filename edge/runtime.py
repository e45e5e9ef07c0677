"""The interface every edge runtime offers the decode loop (PyTorch and ONNX Runtime implement it)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


@dataclass
class EdgeStep:
    """What one edge call returns for a chunk of new positions."""

    logits: np.ndarray  # [vocab] float32: exit-head logits at the chunk's last position (predicts the next token)
    hidden: np.ndarray  # [n, H] float32: layer-K hidden states of every position in the chunk
    # A multi-exit runtime (offramp.edge.multi_exit) may stop at an earlier exit. Then `hidden` holds the layer-K
    # states this call completed: those of the positions an earlier step left pending, then the chunk's (none if
    # this step exited early too); the last `pending` positions of the cache still lack theirs.
    exit_layer: int | None = None  # the layer whose exit head gave `logits`; None: the runtime's exit_layer (K)
    pending: int = 0  # positions at the end of the cache without a layer-K state yet
    confidence: float | None = None  # an early exit's own confidence (its calibrated rule); None: the loop's rule decides


class EdgeRuntime(Protocol):
    """Runs layers 0..K-1 + exit head over new tokens, keeping its own KV cache; positions are implicit."""

    exit_layer: int
    hidden_size: int
    vocab_size: int
    max_positions: int

    @property
    def length(self) -> int:
        """Positions currently held in the KV cache."""
        ...

    def run(self, input_ids: list[int]) -> EdgeStep:
        """Process `input_ids` at positions length..length+n-1 (a prefill chunk or one decode step)."""
        ...

    def fill(self) -> np.ndarray:
        """The layer-K states [pending, H] of the positions early exits left pending (the newest ones), computed now;
        a runtime with one exit never leaves any, and returns an empty array."""
        ...

    def truncate(self, length: int) -> None:
        """Drop cached positions >= length (rollback), pending ones included."""
        ...

    def reset(self) -> None:
        """Forget everything: a new sequence."""
        ...
