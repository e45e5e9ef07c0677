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

    def truncate(self, length: int) -> None:
        """Drop cached positions >= length (rollback)."""
        ...

    def reset(self) -> None:
        """Forget everything: a new sequence."""
        ...
