"""The PyTorch edge runtime: the reference the ONNX graph is checked against, and the fallback without ONNX."""

from __future__ import annotations

import numpy as np
import torch

from offramp.edge.runtime import EdgeStep
from offramp.models.decoder import KV
from offramp.models.split import EdgePart
from offramp.shared.errors import OfframpError


class ContextLengthError(OfframpError, ValueError):
    """A sequence longer than the model's context window."""


class TorchEdgeRuntime:
    """Runs an `EdgePart` step by step with a KV cache held as torch tensors."""

    def __init__(self, edge: EdgePart, manifest: dict | None = None) -> None:
        self.edge = edge.eval()
        self.manifest = manifest  # the edge's identity for the cloud's hello (models.fingerprint.edge_identity)
        self.exit_layer = edge.exit_layer
        self.hidden_size = edge.geometry.hidden_size
        self.vocab_size = edge.geometry.vocab_size
        self.max_positions = edge.geometry.max_positions
        self._past: list[KV] | None = None
        self._length = 0

    @property
    def length(self) -> int:
        return self._length

    @torch.inference_mode()
    def run(self, input_ids: list[int]) -> EdgeStep:
        if not input_ids:
            raise ValueError("run() needs at least one token id")
        if self._length + len(input_ids) > self.max_positions:
            raise ContextLengthError(
                f"{self._length + len(input_ids)} positions exceed the context length {self.max_positions}"
            )
        ids = torch.tensor([input_ids], dtype=torch.long)
        positions = torch.arange(self._length, self._length + len(input_ids))[None]
        out = self.edge(ids, positions, self._past)
        self._past = out.present
        self._length += len(input_ids)
        return EdgeStep(
            logits=out.exit_logits[0, -1].float().numpy(),
            hidden=out.hidden[0].float().numpy(),
        )

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self._length:
            raise ValueError(f"cannot truncate to {length}: cache holds {self._length} positions")
        if self._past is not None:
            self._past = [(k[:, :, :length], v[:, :, :length]) for k, v in self._past]
        self._length = length

    def reset(self) -> None:
        self._past, self._length = None, 0
