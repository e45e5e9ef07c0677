"""The edge graph's manifest: what `offramp export` writes beside `edge.onnx` and every edge runtime checks.

It names the model (fingerprint), the exit layer, the precision, the head, the tensor names and the files, so a
runtime refuses a graph that is not the one it was asked for. Plain JSON and pathlib: the edge reads it without
torch or onnx.
"""

from __future__ import annotations

import json
from pathlib import Path

from offramp.shared.errors import ArtifactError

GRAPH_FILE = "edge.onnx"
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = "offramp-edge-graph"
MANIFEST_FORMAT_VERSION = 2  # 2: quantized graphs record their recipe (a version-1 graph in a cache is re-exported)
PRECISIONS = ("fp32", "int8", "q4")  # quantized ones: offramp.models.quantize.RECIPES


def io_names(exit_layer: int, head_kv_layers: int = 0, first_layer: int = 0) -> tuple[list[str], list[str]]:
    """Input and output tensor names of the edge graph, in order: the edge layers' KV (`key_0`..), then the exit
    head's own (`key_head0`.., manifest `head_kv_layers`, 0 for position-wise heads).

    A later segment of a multi-exit edge (`first_layer` > 0) takes the layer-`first_layer` states (`hidden_in`)
    instead of token ids, and its KV names count from its first layer (`key_8`.. for a segment starting at 8)."""
    layers = [str(i) for i in range(first_layer, exit_layer)] + [f"head{j}" for j in range(head_kv_layers)]
    kv = [f"{kv}_{i}" for i in layers for kv in ("key", "value")]
    first = "input_ids" if first_layer == 0 else "hidden_in"
    return [first, "position_ids"] + [f"past_{n}" for n in kv], ["exit_logits", "hidden"] + [f"present_{n}" for n in kv]


def read_format_json(path: Path, fmt: str, version: int, what: str) -> dict:
    """A JSON object whose `format` is `fmt` at `format_version` `version`; ArtifactError (naming the file and `what`
    to export again) for anything else. The one reader of offramp's manifests (edge graph, edge directory)."""
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); re-export the {what}") from exc
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise ArtifactError(f"{path} is not an offramp {what} manifest (format {data.get('format') if isinstance(data, dict) else None!r})")
    if data.get("format_version") != version:
        raise ArtifactError(f"{path} has format_version {data.get('format_version')!r}; this offramp reads {version}")
    return data


def read_manifest(graph_dir: Path | str) -> dict:
    """The parsed manifest of an exported graph dir; ArtifactError if it is missing or not ours."""
    path = Path(graph_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"no {MANIFEST_FILE} in {graph_dir}: not an exported edge graph (run `offramp export`)")
    return read_format_json(path, MANIFEST_FORMAT, MANIFEST_FORMAT_VERSION, "edge graph")


def check_manifest(
    graph_dir: Path | str,
    fingerprint: str | None = None,
    exit_layer: int | None = None,
    precision: str | None = None,
    head: dict | None = None,
) -> dict:
    """Read the manifest, check the files it lists exist with their sizes, and compare the given expectations."""
    graph_dir = Path(graph_dir)
    manifest = read_manifest(graph_dir)
    for name, size in manifest.get("files", {}).items():
        path = graph_dir / name
        if not path.is_file():
            raise ArtifactError(f"{path} is missing (listed in {MANIFEST_FILE}); re-export the edge graph")
        if path.stat().st_size != size:
            raise ArtifactError(f"{path} is {path.stat().st_size} bytes, the manifest says {size}: truncated or replaced; re-export")
    expected = {"model_fingerprint": fingerprint, "exit_layer": exit_layer, "precision": precision, "head": head}
    for key, want in expected.items():
        if want is not None and manifest.get(key) != want:
            raise ArtifactError(f"edge graph in {graph_dir} has {key}={manifest.get(key)!r}, expected {want!r}")
    return manifest
