"""The ONNX Runtime edge runtime: the exported edge graph with a KV cache held as numpy arrays.

Plain `session.run` with numpy in and out: on CPU, IOBinding measured no faster for a decode step (the inputs
are already host memory and the presents come back as new arrays either way), and numpy arrays make
`truncate` a slice.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from offramp.edge.runtime import EdgeStep
from offramp.shared.edge_manifest import GRAPH_FILE, check_manifest, io_names
from offramp.shared.errors import ArtifactError, ContextLengthError

MAX_DEFAULT_THREADS = 8
_SESSIONS: dict[tuple, ort.InferenceSession] = {}  # one per graph file (and its version, threads, providers)
_SESSIONS_LOCK = threading.Lock()


def _shared_session(graph: Path, options: ort.SessionOptions, providers: tuple[str, ...]) -> ort.InferenceSession:
    """One inference session per graph in a process: sessions are read-only and run concurrent calls safely,
    so several services over one edge directory (the bench's settings, a test's apps) share its weights."""
    stat = graph.stat()
    key = (str(graph.resolve()), stat.st_mtime_ns, stat.st_size, options.intra_op_num_threads, providers)
    with _SESSIONS_LOCK:
        session = _SESSIONS.get(key)
        if session is None:
            try:
                session = ort.InferenceSession(str(graph), options, providers=list(providers))
            except Exception as exc:  # ORT raises its own Fail/InvalidGraph/InvalidProtobuf types
                raise ArtifactError(f"ONNX Runtime cannot load {graph}: {exc}") from exc
            _SESSIONS[key] = session
        return session


def default_providers(precision: str = "fp32") -> list[str]:
    """TensorRT (fp32 graphs only: its int8 path wants calibration, not our contrib ops), then CUDA, then CPU."""
    available = ort.get_available_providers()
    chosen = []
    if precision == "fp32" and "TensorrtExecutionProvider" in available:
        chosen.append("TensorrtExecutionProvider")
    if "CUDAExecutionProvider" in available:
        chosen.append("CUDAExecutionProvider")
    return chosen + ["CPUExecutionProvider"]


def default_threads() -> int:
    """One intra-op thread per CPU this process may use, capped: past ~8 a 135M-model step stops scaling."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, MAX_DEFAULT_THREADS))


class OnnxGraph:
    """One exported graph file's session and tensor names, without state: runtimes sharing it keep their own KV
    (a pool's clones, the segments of a multi-exit edge)."""

    def __init__(self, graph: Path, inputs: list[str], outputs: list[str], kv_shape: tuple[int, ...], threads: int | None, providers: list[str]) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or default_threads()
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = _shared_session(graph, options, tuple(providers))
        self.inputs, self.outputs, self.kv_shape = inputs, outputs, kv_shape
        names_in = [i.name for i in self.session.get_inputs()]
        names_out = [o.name for o in self.session.get_outputs()]
        if names_in != inputs or names_out != outputs:
            raise ArtifactError(f"{graph} has inputs {names_in} / outputs {names_out}, not {inputs} / {outputs}")

    def empty_past(self) -> list[np.ndarray]:
        return [np.zeros(self.kv_shape, dtype=np.float32) for _ in range(len(self.inputs) - 2)]

    def __call__(self, first: np.ndarray, positions: np.ndarray, past: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """(token ids [n] or hidden states [n, H], positions [n], past) -> (logits [V] of the last, hidden [n, H], present)."""
        feed = {self.inputs[0]: first[None], self.inputs[1]: positions[None]}
        feed.update(zip(self.inputs[2:], past))
        logits, hidden, *present = self.session.run(self.outputs, feed)
        return logits[0], hidden[0], present

    @staticmethod
    def truncate(past: list[np.ndarray], length: int) -> list[np.ndarray]:
        return [np.ascontiguousarray(t[:, :, :length]) for t in past]


class OnnxEdgeRuntime:
    """Runs an exported edge graph step by step; implements `offramp.edge.runtime.EdgeRuntime`."""

    def __init__(
        self,
        graph_dir: Path | str,
        providers: list[str] | None = None,
        intra_op_threads: int | None = None,
        fingerprint: str | None = None,
        exit_layer: int | None = None,
        precision: str | None = None,
    ) -> None:
        self.graph_dir = Path(graph_dir)
        self.manifest = check_manifest(self.graph_dir, fingerprint=fingerprint, exit_layer=exit_layer, precision=precision)
        m = self.manifest
        if "segments" in m:
            raise ArtifactError(f"{self.graph_dir} holds a multi-exit edge (exits at {m.get('exit_layers')}): open it with offramp.edge.multi_exit.open_edge_runtime")
        self.exit_layer: int = m["exit_layer"]
        self.hidden_size: int = m["hidden_size"]
        self.vocab_size: int = m["vocab_size"]
        self.max_positions: int = m["max_positions"]
        self.precision: str = m["precision"]
        self.kv_layers: int = self.exit_layer + int(m.get("head_kv_layers", 0))  # the exit head's own KV too
        self.providers = providers or default_providers(self.precision)
        inputs, outputs = io_names(self.exit_layer, self.kv_layers - self.exit_layer)
        graph = self.graph_dir / m.get("graph_file", GRAPH_FILE)
        self.graph = OnnxGraph(graph, inputs, outputs, (1, m["num_kv_heads"], 0, m["head_dim"]), intra_op_threads, self.providers)
        self.session = self.graph.session
        self._past: list[np.ndarray] = []
        self.reset()

    @property
    def length(self) -> int:
        return self._length

    def run(self, input_ids: list[int]) -> EdgeStep:
        if len(input_ids) == 0:
            raise ValueError("run() needs at least one token id")
        n = len(input_ids)
        if self._length + n > self.max_positions:
            raise ContextLengthError(f"{self._length + n} positions exceed the context length {self.max_positions}")
        ids = np.asarray(input_ids, dtype=np.int64)
        logits, hidden, self._past = self.graph(ids, np.arange(self._length, self._length + n, dtype=np.int64), self._past)
        self._length += n
        return EdgeStep(logits=logits, hidden=hidden)

    def fill(self) -> np.ndarray:
        """Nothing to fill: one exit leaves no position without its layer-K state."""
        return np.zeros((0, self.hidden_size), dtype=np.float32)

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self._length:
            raise ValueError(f"cannot truncate to {length}: cache holds {self._length} positions")
        if length < self._length:
            self._past = self.graph.truncate(self._past, length)
        self._length = length

    def reset(self) -> None:
        self._past = self.graph.empty_past()
        self._length = 0
