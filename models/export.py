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
from collections.abc import Callable, Sequence
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
from offramp.shared.errors import SplitConfigError
from offramp.shared.exit_layers import check_exit_layers
from offramp.shared.version import __version__

OPSET = 18
_PROTOBUF_LIMIT = 1_800_000_000  # bytes of weights above which the graph is saved with external data


def io_spec(edge: EdgePart) -> tuple[list[dict], list[dict]]:
    """Names, dtypes and shapes (symbolic dims named) of the graph's inputs and outputs, for the manifest."""
    g = edge.geometry
    kv_in, kv_out = [1, g.num_kv_heads, "past_len", g.head_dim], [1, g.num_kv_heads, "past_len + seq", g.head_dim]
    ins, outs = io_names(edge.exit_layer, edge.head_kv_layers, edge.first_layer)
    first = {"name": ins[0], "dtype": "int64", "shape": [1, "seq"]} if edge.first_layer == 0 else {"name": ins[0], "dtype": "float32", "shape": [1, "seq", g.hidden_size]}
    inputs = [first, {"name": ins[1], "dtype": "int64", "shape": [1, "seq"]}]
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
    ids = torch.zeros((1, seq_len), dtype=torch.long) if edge.first_layer == 0 else torch.zeros((1, seq_len, g.hidden_size))
    positions = torch.arange(past_len, past_len + seq_len)[None]
    past = [torch.zeros(1, g.num_kv_heads, past_len, g.head_dim) for _ in range(2 * (len(edge.layers) + edge.head_kv_layers))]
    seq = torch.export.Dim("seq", min=1, max=g.max_positions)
    past_dim = torch.export.Dim("past_len", min=0, max=g.max_positions)
    shapes = {"input_ids": {1: seq}, "position_ids": {1: seq}, "past_flat": tuple({2: past_dim} for _ in past)}
    ins, outs = io_names(edge.exit_layer, edge.head_kv_layers, edge.first_layer)
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


def _write_graph(edge: EdgePart, graph: Path, precision: str, bar: tqdm) -> dict | None:
    """Trace `edge`, fold its tied weights and save it as `graph` (quantized through an fp32 copy unless fp32);
    returns the quantization record. Advances `bar` by 3 stages (4 when quantized)."""
    bar.set_postfix_str("tracing")
    proto = _trace(edge)
    bar.update()
    bar.set_postfix_str("folding tied weights")
    proto = fold_weight_transposes(proto)
    bar.update()
    bar.set_postfix_str("saving")
    quantization = None
    if precision != "fp32":
        from offramp.models.quantize import quantize_graph

        fp32_path = graph.parent / "fp32" / graph.name
        fp32_path.parent.mkdir()
        save_graph(proto, fp32_path)
        del proto
        bar.update()
        bar.set_postfix_str(f"quantizing {precision}")
        quantization = quantize_graph(fp32_path, graph, precision)
        shutil.rmtree(fp32_path.parent)
    else:
        save_graph(proto, graph)
        del proto
    bar.update()
    return quantization


def _manifest(model: PreTrainedModel, last: EdgePart, precision: str, head_manifest: dict | None) -> dict:
    """The manifest fields every edge graph dir has (the graph's own files and tensors are added by the caller)."""
    g = last.geometry
    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_FORMAT_VERSION,
        "offramp_version": __version__,
        "model_fingerprint": model_fingerprint(model),
        "model_type": model.config.model_type,
        "exit_layer": last.exit_layer,
        "head_kv_layers": last.head_kv_layers,
        "precision": precision,
        "quantization": None,
        "opset": OPSET,
        "graph_file": GRAPH_FILE,
        "num_layers": g.num_layers,
        "hidden_size": g.hidden_size,
        "vocab_size": g.vocab_size,
        "num_kv_heads": g.num_kv_heads,
        "head_dim": g.head_dim,
        "max_positions": g.max_positions,
        "head": head_identity(last.head, head_manifest),
    }


def _staged_export(out_dir: Path, total_stages: int, desc: str, progress: bool, write: Callable[[Path, tqdm], dict]) -> Path:
    """Run `write(tmp, bar)` into a temp dir beside `out_dir`, write the manifest it returns (with the files'
    sizes) and rename the dir in, so a crash never leaves half a graph."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir.parent))
    os.chmod(tmp, 0o755)
    try:
        with tqdm(total=total_stages + 1, desc=desc, unit="stage", disable=not progress) as bar:
            manifest = write(tmp, bar)
            bar.set_postfix_str("manifest")
            manifest["files"] = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
            (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
            bar.update()
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")


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
    _check_precision(precision)
    edge = EdgePart(model, exit_layer, head).eval()

    def write(tmp: Path, bar: tqdm) -> dict:
        quantization = _write_graph(edge, tmp / GRAPH_FILE, precision, bar)
        inputs, outputs = io_spec(edge)
        return _manifest(model, edge, precision, head_manifest) | {"quantization": quantization, "inputs": inputs, "outputs": outputs}

    stages = 3 + (precision != "fp32")
    return _staged_export(Path(out_dir), stages, f"export K={exit_layer} {precision}", progress, write)


def segment_file(index: int) -> str:
    return f"segment-{index}.onnx"


def export_multi_exit(
    model: PreTrainedModel,
    exit_layers: Sequence[int],
    out_dir: Path | str,
    precision: str = "fp32",
    heads: Sequence[tuple[nn.Module | None, dict | None]] | None = None,
    progress: bool = True,
) -> Path:
    """One graph per segment of a multi-exit edge (exits at k1 < k2 < ... < K) + `manifest.json` into out_dir.

    Segment i runs layers k_{i-1}..k_i - 1 (the first from token ids, the others from the previous segment's
    hidden states) and the exit head at k_i (`heads[i]`: (module, training manifest), None: final norm + LM head),
    with its own KV. The manifest is a single-exit one for the last exit K (what the cloud continues from) plus
    `exit_layers` and `segments` (each segment's layers, file, head and tensors); offramp.edge.multi_exit runs it.
    """
    _check_precision(precision)
    layers = check_exit_layers(exit_layers, model.config.num_hidden_layers)
    if len(layers) < 2:
        raise SplitConfigError(f"a multi-exit edge needs two exit layers or more, got {list(layers)}; export one with export_edge")
    heads = list(heads) if heads is not None else [(None, None)] * len(layers)
    if len(heads) != len(layers):
        raise SplitConfigError(f"{len(heads)} exit heads for {len(layers)} exit layers {list(layers)}")
    firsts = (0, *layers[:-1])
    parts = [EdgePart(model, k, head, first_layer=first).eval() for first, k, (head, _) in zip(firsts, layers, heads)]

    def write(tmp: Path, bar: tqdm) -> dict:
        segments = []
        for i, (part, (_, head_manifest)) in enumerate(zip(parts, heads)):
            quantization = _write_graph(part, tmp / segment_file(i), precision, bar)
            inputs, outputs = io_spec(part)
            segments.append({
                "first_layer": part.first_layer, "exit_layer": part.exit_layer, "graph_file": segment_file(i),
                "head_kv_layers": part.head_kv_layers, "head": head_identity(part.head, head_manifest),
                "quantization": quantization, "inputs": inputs, "outputs": outputs,
            })
        manifest = _manifest(model, parts[-1], precision, heads[-1][1])
        manifest.update(graph_file=None, quantization=segments[-1]["quantization"], exit_layers=list(layers), segments=segments)
        return manifest

    stages = len(parts) * (3 + (precision != "fp32"))
    desc = f"export exits {'/'.join(map(str, layers))} {precision}"
    return _staged_export(Path(out_dir), stages, desc, progress, write)
