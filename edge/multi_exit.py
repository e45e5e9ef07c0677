"""Several exits on the edge (`--exit-layers 8 15`, as CE-CoLLM has): a token confident at an earlier exit skips
the edge's remaining layers.

The edge graph is cut into segments, one per exit: segment i runs layers k_{i-1}..k_i - 1 and the exit head at
k_i, with its own KV cache. A step runs segment 1 on the new token; if the exit rule of k1 (its own calibrated
rule and threshold, an `ExitGate`) is confident, the step ends there and the position's layer-k1 state waits.
The next step that goes past k1 runs the remaining segments over [waiting positions + the new one] in one call
(as the early-exit vLLM framework fills skipped layers' KV), so every later token attends to complete KV at every
layer; `fill()` does the same on demand, when the cloud needs a waiting position's layer-K state (a lossless
draft to verify, an exit-mode catch-up). The cloud only ever sees layer-K states of the last exit (K = the
split), so the protocol does not change.

The segments are `SegmentGraph`s: ONNX Runtime graphs here (`open_edge_runtime`), the PyTorch reference in
offramp.models.reference_runtime. No torch is imported here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from offramp.edge.onnx_runtime import OnnxEdgeRuntime, OnnxGraph, default_providers
from offramp.edge.runtime import EdgeRuntime, EdgeStep
from offramp.shared.edge_manifest import check_manifest, io_names
from offramp.shared.errors import ArtifactError, ContextLengthError
from offramp.shared.exit_layers import check_exit_layers


class SegmentGraph(Protocol):
    """One segment's computation without state (the runtime holds each segment's KV)."""

    def empty_past(self) -> list[Any]: ...

    def __call__(self, first: np.ndarray, positions: np.ndarray, past: list[Any]) -> tuple[np.ndarray, np.ndarray, list[Any]]:
        """(token ids [n] or hidden states [n, H], positions [n], past) -> (logits [V] of the last, hidden [n, H], present)."""
        ...

    def truncate(self, past: list[Any], length: int) -> list[Any]: ...


@dataclass(frozen=True)
class ExitGate:
    """When a token may leave at an early exit: `confidence(logits, hidden) >= threshold` (the exit head's own rule)."""

    confidence: Callable[[np.ndarray, np.ndarray], float]
    threshold: float


class MultiExitRuntime:
    """Implements `EdgeRuntime` over segments ending at `exit_layers` (the last is K); `gates[i]` decides exits at
    `exit_layers[i]` for every exit but the last (whose drafts the decode loop judges, as with one exit)."""

    def __init__(
        self,
        segments: Sequence[SegmentGraph],
        exit_layers: Sequence[int],
        gates: Sequence[ExitGate],
        hidden_size: int,
        vocab_size: int,
        max_positions: int,
        manifest: dict | None = None,
    ) -> None:
        self.exit_layers = check_exit_layers(exit_layers)
        if len(segments) != len(self.exit_layers) or len(gates) != len(self.exit_layers) - 1:
            raise ArtifactError(f"{len(segments)} segments and {len(gates)} exit gates for exit layers {list(self.exit_layers)}: "
                                "need one segment per exit and one gate per exit before the last")
        self.segments = list(segments)
        self.gates = list(gates)
        self.exit_layer = self.exit_layers[-1]
        self.hidden_size, self.vocab_size, self.max_positions = hidden_size, vocab_size, max_positions
        self.manifest = manifest  # the edge's identity for the cloud's hello: the last exit's
        self.reset()

    @property
    def length(self) -> int:
        return self._lengths[0]

    @property
    def pending(self) -> int:
        """Positions (the newest) whose layer-K state is still to be computed."""
        return self._lengths[0] - self._lengths[-1]

    def reset(self) -> None:
        self._past = [segment.empty_past() for segment in self.segments]
        self._lengths = [0] * len(self.segments)  # positions each segment has run
        # waiting[i]: inputs of segment i (layer k_{i-1} states) for positions lengths[i]..lengths[i-1]-1
        self._waiting = [np.zeros((0, self.hidden_size), dtype=np.float32) for _ in self.segments]

    def _call(self, i: int, first: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        start = self._lengths[i]
        positions = np.arange(start, start + len(first), dtype=np.int64)
        logits, hidden, self._past[i] = self.segments[i](first, positions, self._past[i])
        self._lengths[i] += len(first)
        return logits, hidden

    def _inputs(self, i: int, below: np.ndarray | None) -> np.ndarray:
        """Segment i's input: its waiting positions, then what the segment below just produced."""
        waiting, self._waiting[i] = self._waiting[i], self._waiting[i][:0]
        if below is None or len(below) == 0:
            return waiting
        return np.concatenate([waiting, below]) if len(waiting) else below

    def run(self, input_ids: list[int]) -> EdgeStep:
        """Segment 1 on the new tokens; a single new token confident at an exit stops there (a prefill chunk always
        runs to K); each segment past it runs over its waiting positions and the new ones."""
        if len(input_ids) == 0:
            raise ValueError("run() needs at least one token id")
        if self.length + len(input_ids) > self.max_positions:
            raise ContextLengthError(f"{self.length + len(input_ids)} positions exceed the context length {self.max_positions}")
        logits, hidden = self._call(0, np.asarray(input_ids, dtype=np.int64))
        for i in range(1, len(self.segments)):
            gate = self.gates[i - 1]
            confidence = float(gate.confidence(logits, hidden[-1])) if len(input_ids) == 1 else None
            if confidence is not None and confidence >= gate.threshold:
                self._waiting[i] = np.concatenate([self._waiting[i], hidden])
                return EdgeStep(logits, hidden[:0], exit_layer=self.exit_layers[i - 1], pending=self.pending, confidence=confidence)
            logits, hidden = self._call(i, self._inputs(i, hidden))
        return EdgeStep(logits, hidden, exit_layer=self.exit_layer)

    def fill(self) -> np.ndarray:
        """Run the skipped layers of the pending positions now (one call per segment); their layer-K states."""
        below: np.ndarray | None = None
        for i in range(1, len(self.segments)):
            first = self._inputs(i, below)
            below = self._call(i, first)[1] if len(first) else None
        return below if below is not None else np.zeros((0, self.hidden_size), dtype=np.float32)

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate to {length}: cache holds {self.length} positions")
        for i, segment in enumerate(self.segments):
            if i > 0:  # waiting inputs are positions lengths[i]..: keep those below `length`
                self._waiting[i] = self._waiting[i][: max(0, length - self._lengths[i])]
            if self._lengths[i] > length:
                self._past[i] = segment.truncate(self._past[i], length)
                self._lengths[i] = length


def open_edge_runtime(graph_dir: Path | str, gates: Sequence[ExitGate] = (), intra_op_threads: int | None = None,
                      providers: list[str] | None = None) -> EdgeRuntime:
    """The runtime for an exported graph dir: `OnnxEdgeRuntime` for one exit, `MultiExitRuntime` over its segment
    graphs for several (`gates`: one per exit before the last, in order)."""
    graph_dir = Path(graph_dir)
    m = check_manifest(graph_dir)
    if "segments" not in m:
        return OnnxEdgeRuntime(graph_dir, providers=providers, intra_op_threads=intra_op_threads)
    providers = providers or default_providers(m["precision"])
    kv_shape = (1, m["num_kv_heads"], 0, m["head_dim"])
    segments = []
    for seg in m["segments"]:
        inputs, outputs = io_names(seg["exit_layer"], int(seg.get("head_kv_layers", 0)), seg["first_layer"])
        segments.append(OnnxGraph(graph_dir / seg["graph_file"], inputs, outputs, kv_shape, intra_op_threads, providers))
    return MultiExitRuntime(segments, m["exit_layers"], gates, m["hidden_size"], m["vocab_size"], m["max_positions"], manifest=m)
