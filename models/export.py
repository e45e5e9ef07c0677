"""Export the edge part (embeddings, layers 0..K-1, exit head) as one ONNX graph with an explicit KV cache.

One graph serves prefill chunks and single-token steps: the chunk length `seq` and the cached length `past_len`
are both symbolic (past_len may be 0: zero-length past tensors), and the causal mask is built in-graph from
shapes. Exit logits come out for the last position only (the LM head is ~8x a decoder layer), the layer-K hidden
state for every position (the cloud continues from all of them). `manifest.json` beside the graph says which
model, layer, head and precision it is, so a runtime can refuse a graph that does not match.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from offramp.models.fingerprint import model_fingerprint
from offramp.models.split import EdgePart
from offramp.shared.edge_manifest import (
    GRAPH_FILE,
    MANIFEST_FILE,
    MANIFEST_FORMAT,
    MANIFEST_FORMAT_VERSION,
    PRECISIONS,
    io_names,
)
from offramp.shared.version import __version__

OPSET = 18
_PROTOBUF_LIMIT = 1_800_000_000  # bytes of weights above which the graph is saved with external data


def io_spec(edge: EdgePart) -> tuple[list[dict], list[dict]]:
    """Names, dtypes and shapes (symbolic dims named) of the graph's inputs and outputs, for the manifest."""
    g = edge.geometry
    kv_in, kv_out = [1, g.num_kv_heads, "past_len", g.head_dim], [1, g.num_kv_heads, "past_len + seq", g.head_dim]
    ins, outs = io_names(edge.exit_layer, edge.head_kv_layers)
    inputs = [{"name": ins[0], "dtype": "int64", "shape": [1, "seq"]}, {"name": ins[1], "dtype": "int64", "shape": [1, "seq"]}]
    inputs += [{"name": n, "dtype": "float32", "shape": kv_in} for n in ins[2:]]
    outputs = [
        {"name": outs[0], "dtype": "float32", "shape": [1, g.vocab_size]},
        {"name": outs[1], "dtype": "float32", "shape": [1, "seq", g.hidden_size]},
    ]
    outputs += [{"name": n, "dtype": "float32", "shape": kv_out} for n in outs[2:]]
    return inputs, outputs


class _EdgeGraph(nn.Module):
    """The traced function: flat past tensors in, last-position logits + all hidden states + flat present out."""

    def __init__(self, edge: EdgePart) -> None:
        super().__init__()
        self.edge = edge

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, *past_flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
        past = [(past_flat[2 * i], past_flat[2 * i + 1]) for i in range(len(past_flat) // 2)]
        out = self.edge(input_ids, position_ids, past, explicit_mask=True, last_only=True)
        return (out.exit_logits[:, 0, :], out.hidden, *[t for kv in out.present for t in kv])


def _trace(edge: EdgePart) -> onnx.ModelProto:
    """torch.export-based (dynamo) export; example sizes avoid 0/1 so neither dim gets specialised."""
    g = edge.geometry
    seq_len, past_len = 5, 3
    ids = torch.zeros((1, seq_len), dtype=torch.long)
    positions = torch.arange(past_len, past_len + seq_len)[None]
    past = [torch.zeros(1, g.num_kv_heads, past_len, g.head_dim) for _ in range(2 * (edge.exit_layer + edge.head_kv_layers))]
    seq = torch.export.Dim("seq", min=1, max=g.max_positions)
    past_dim = torch.export.Dim("past_len", min=0, max=g.max_positions)
    shapes = {"input_ids": {1: seq}, "position_ids": {1: seq}, "past_flat": tuple({2: past_dim} for _ in past)}
    ins, outs = io_names(edge.exit_layer, edge.head_kv_layers)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _EdgeGraph(edge).eval(), (ids, positions, *past), input_names=ins, output_names=outs,
            dynamic_shapes=shapes, opset_version=OPSET, dynamo=True, verbose=False,
        )
    return program.model_proto


def fold_weight_transposes(model: onnx.ModelProto) -> onnx.ModelProto:
    """Pre-transpose weights the exporter left as runtime `Transpose(initializer)` (the LM head of a tied model).

    A tied table is then stored once, as [H, V]: the embedding Gather reads its columns (axis=1) and the LM head
    MatMul reads it directly. That keeps one copy on disk, and lets the int8 quantizer see the LM head's weight.
    """
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    transposed: dict[str, str] = {}
    nodes: list[onnx.NodeProto] = []
    for node in g.node:
        if node.op_type == "Transpose" and node.input[0] in inits:
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            arr = numpy_helper.to_array(inits[node.input[0]])
            g.initializer.append(numpy_helper.from_array(np.ascontiguousarray(arr.transpose(perm)), node.output[0]))
            if arr.ndim == 2 and perm in (None, [1, 0]):
                transposed[node.input[0]] = node.output[0]
            continue
        nodes.append(node)
    rewritten: list[onnx.NodeProto] = []
    for node in nodes:
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if node.op_type == "Gather" and node.input[0] in transposed and axis == 0:
            cols = node.output[0] + "_cols"  # [H, *ids.shape]
            rank = 1 + 2  # ids are [1, seq]
            rewritten.append(helper.make_node("Gather", [transposed[node.input[0]], node.input[1]], [cols], name=node.name + "_cols", axis=1))
            rewritten.append(helper.make_node("Transpose", [cols], [node.output[0]], name=node.name + "_rows", perm=[*range(1, rank), 0]))
            continue
        rewritten.append(node)
    del g.node[:]
    g.node.extend(rewritten)
    used = {i for node in g.node for i in node.input}
    kept = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    return model


def save_graph(model: onnx.ModelProto, path: Path) -> None:
    """One file below protobuf's 2 GB limit, else weights in `<name>.data` beside it."""
    weight_bytes = sum(len(i.raw_data) for i in model.graph.initializer)
    if weight_bytes < _PROTOBUF_LIMIT:
        onnx.save(model, str(path))
    else:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=path.name + ".data")


def head_identity(head: nn.Module, head_manifest: dict | None) -> dict:
    """What the manifest records about the exit head (compared by `ensure_edge_graph`)."""
    return {"kind": getattr(head, "kind", type(head).__name__), "manifest": head_manifest}


def export_edge(
    model: PreTrainedModel,
    exit_layer: int,
    out_dir: Path | str,
    precision: str = "fp32",
    head: nn.Module | None = None,
    head_manifest: dict | None = None,
    progress: bool = True,
) -> Path:
    """Write `edge.onnx` + `manifest.json` for layers 0..K-1 and `head` (default: final norm + LM head) into out_dir.

    The directory is written next to its final place and renamed in, so a crash never leaves a half graph.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
    out_dir = Path(out_dir)
    edge = EdgePart(model, exit_layer, head).eval()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)
    quantized = precision != "fp32"
    stages = ["tracing", "folding tied weights", "saving"] + ([f"quantizing {precision}"] if quantized else []) + ["manifest"]
    try:
        with tqdm(total=len(stages), desc=f"export K={exit_layer} {precision}", unit="stage", disable=not progress) as bar:
            bar.set_postfix_str(stages[0])
            proto = _trace(edge)
            bar.update()
            bar.set_postfix_str(stages[1])
            proto = fold_weight_transposes(proto)
            bar.update()
            bar.set_postfix_str(stages[2])
            graph = tmp / GRAPH_FILE
            quantization = None
            if quantized:
                from offramp.models.quantize import quantize_graph

                fp32_path = tmp / "fp32" / GRAPH_FILE
                fp32_path.parent.mkdir()
                save_graph(proto, fp32_path)
                del proto
                bar.update()
                bar.set_postfix_str(stages[3])
                quantization = quantize_graph(fp32_path, graph, precision)
                shutil.rmtree(fp32_path.parent)
            else:
                save_graph(proto, graph)
                del proto
            bar.update()
            bar.set_postfix_str(stages[-1])
            inputs, outputs = io_spec(edge)
            g = edge.geometry
            manifest = {
                "format": MANIFEST_FORMAT,
                "format_version": MANIFEST_FORMAT_VERSION,
                "offramp_version": __version__,
                "model_fingerprint": model_fingerprint(model),
                "model_type": model.config.model_type,
                "exit_layer": exit_layer,
                "head_kv_layers": edge.head_kv_layers,
                "precision": precision,
                "quantization": quantization,
                "opset": OPSET,
                "graph_file": GRAPH_FILE,
                "num_layers": g.num_layers,
                "hidden_size": g.hidden_size,
                "vocab_size": g.vocab_size,
                "num_kv_heads": g.num_kv_heads,
                "head_dim": g.head_dim,
                "max_positions": g.max_positions,
                "head": head_identity(edge.head, head_manifest),
                "inputs": inputs,
                "outputs": outputs,
                "files": {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()},
            }
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
            bar.update()
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
