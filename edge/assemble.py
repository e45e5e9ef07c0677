"""Put an edge runtime and a cloud link together from a model spec: the wiring shared by CLI, daemon and SDK."""

from __future__ import annotations

from pathlib import Path

from torch import nn
from transformers import PreTrainedModel

from offramp.cloud.context import ContextManager
from offramp.cloud.engine import DeepEngine
from offramp.edge.link import LocalCloudLink
from offramp.edge.runtime import EdgeRuntime
from offramp.edge.torch_runtime import TorchEdgeRuntime
from offramp.models.fingerprint import edge_identity
from offramp.models.split import CloudPart, EdgePart

EDGE_PRECISIONS = ("auto", "q4", "int8", "fp32", "torch")


def resolve_precision(precision: str, cloud: str) -> str:
    """`auto`: the int8 graph when the edge works alone, the q4 graph when it sends hidden states to a cloud.

    What the cloud continues from is the layer-K state, so collaboration takes the graph whose states equal fp32's:
    q4 stores the layers' weights losslessly where the checkpoint already lies on a 4-bit block grid (the default
    model) and multiplies in fp32; a weight off the grid stays fp32, so q4 is never less faithful than fp32. On
    the default model at K=15 (teacher-forced, 6,946 held-out positions, `scripts/bench_edge_step.py --accuracy`)
    the cloud's greedy token was kept at 100% of positions with q4 and fp32, 97.4% with int8 (int8 activations
    lose Llama's outlier channels), at 0.51x (q4) and 0.45x (int8) the fp32 graph's step time (table in
    offramp.models.quantize). Alone, the edge only needs its exit head's logits, and int8 is the fastest graph.
    """
    if precision != "auto":
        return precision
    return "int8" if cloud == "none" else "q4"


def build_edge_runtime(
    model: PreTrainedModel,
    exit_layer: int,
    precision: str,
    model_spec: str = "default",
    head: nn.Module | None = None,
    head_dir: Path | None = None,
) -> EdgeRuntime:
    """`torch` runs the PyTorch edge part; `q4`/`int8`/`fp32` run the ONNX graph (exported on first use)."""
    if precision == "auto":
        raise ValueError("resolve 'auto' with resolve_precision(precision, cloud) first")
    if precision == "torch":
        if head is None and head_dir is not None:
            from offramp.models.exit_heads import load_head

            head, _ = load_head(Path(head_dir), model)
        return TorchEdgeRuntime(EdgePart(model, exit_layer, head), manifest=edge_identity(model, exit_layer))
    if precision not in EDGE_PRECISIONS:
        raise ValueError(f"edge precision {precision!r} is not one of {EDGE_PRECISIONS}")
    from offramp.edge.onnx_runtime import OnnxEdgeRuntime, ensure_edge_graph

    graph_dir = ensure_edge_graph(model_spec, exit_layer, precision, head_dir=head_dir, model=model)
    return OnnxEdgeRuntime(graph_dir)


def build_local_link(model: PreTrainedModel, exit_layer: int, codec: str = "fp32", kv_budget_bytes: int | None = None) -> LocalCloudLink:
    """The cloud's engine in this process (`--cloud local`)."""
    engine = DeepEngine(CloudPart(model, exit_layer), ContextManager(budget_bytes=kv_budget_bytes))
    return LocalCloudLink(engine, codec)
