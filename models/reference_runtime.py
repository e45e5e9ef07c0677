"""The PyTorch reference of the edge graph: what the exported ONNX graph is checked against, token for token.

It lives with the models (it needs torch); the edge itself runs only exported graphs (`offramp.edge.onnx_runtime`).
Tests and benchmarks use it where the PyTorch forward is the point: exactness against `model.generate`, the
edge-step micro-benchmark, the load driver's in-process edges.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from offramp.edge.multi_exit import ExitGate, MultiExitRuntime
from offramp.edge.runtime import EdgeStep
from offramp.models.fingerprint import edge_identity
from offramp.models.decoder import KV
from offramp.models.split import EdgePart
from offramp.shared.errors import ContextLengthError
from offramp.shared.exit_layers import check_exit_layers


class TorchEdgeRuntime:
    """Runs an `EdgePart` step by step with a KV cache held as torch tensors; implements `EdgeRuntime`."""

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

    def fill(self) -> np.ndarray:
        return np.zeros((0, self.hidden_size), dtype=np.float32)  # one exit: nothing is ever pending

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self._length:
            raise ValueError(f"cannot truncate to {length}: cache holds {self._length} positions")
        if self._past is not None:
            self._past = [(k[:, :, :length], v[:, :, :length]) for k, v in self._past]
        self._length = length

    def reset(self) -> None:
        self._past, self._length = None, 0


def reference_runtime(model: nn.Module, exit_layer: int, head: nn.Module | None = None) -> TorchEdgeRuntime:
    """The reference runtime for layers 0..K-1 of `model` plus `head` (default: final norm + LM head), carrying
    the identity a WebSocket hello needs."""
    return TorchEdgeRuntime(EdgePart(model, exit_layer, head), manifest=edge_identity(model, exit_layer))


class TorchSegment:
    """One segment of a multi-exit edge in PyTorch (an `EdgePart` with its `first_layer`); implements
    offramp.edge.multi_exit.SegmentGraph, so `MultiExitRuntime` runs it as it runs the exported graphs."""

    def __init__(self, part: EdgePart) -> None:
        self.part = part.eval()

    def empty_past(self) -> list[KV]:
        return []

    @torch.inference_mode()
    def __call__(self, first: np.ndarray, positions: np.ndarray, past: list[KV]) -> tuple[np.ndarray, np.ndarray, list[KV]]:
        out = self.part(torch.from_numpy(first)[None], torch.from_numpy(positions)[None], past or None)
        return out.exit_logits[0, -1].float().numpy(), out.hidden[0].float().numpy(), out.present

    @staticmethod
    def truncate(past: list[KV], length: int) -> list[KV]:
        return [(k[:, :, :length], v[:, :, :length]) for k, v in past]


def reference_multi_exit_runtime(
    model: nn.Module, exit_layers: Sequence[int], gates: Sequence[ExitGate], heads: Sequence[nn.Module | None] | None = None
) -> MultiExitRuntime:
    """The reference of a multi-exit edge: segments of `model` ending at `exit_layers` with `heads` (default: final
    norm + LM head at each exit), the early exits decided by `gates`."""
    layers = check_exit_layers(exit_layers, model.config.num_hidden_layers)
    heads = list(heads) if heads is not None else [None] * len(layers)
    firsts = (0, *layers[:-1])
    segments = [TorchSegment(EdgePart(model, k, head, first_layer=first)) for first, k, head in zip(firsts, layers, heads)]
    g = segments[-1].part.geometry
    return MultiExitRuntime(segments, layers, gates, g.hidden_size, g.vocab_size, g.max_positions, manifest=edge_identity(model, layers[-1]))
