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
MANIFEST_FORMAT_VERSION = 1
PRECISIONS = ("fp32", "int8", "q4")  # quantized ones: offramp.models.quantize.RECIPES


def io_names(exit_layer: int) -> tuple[list[str], list[str]]:
    """Input and output tensor names of the edge graph, in order."""
    kv = [(f"{kv}_{i}") for i in range(exit_layer) for kv in ("key", "value")]
    return ["input_ids", "position_ids"] + [f"past_{n}" for n in kv], ["exit_logits", "hidden"] + [f"present_{n}" for n in kv]


def read_manifest(graph_dir: Path | str) -> dict:
    """The parsed manifest of an exported graph dir; ArtifactError if it is missing or not ours."""
    path = Path(graph_dir) / MANIFEST_FILE
    if not path.is_file():
        raise ArtifactError(f"no {MANIFEST_FILE} in {graph_dir}: not an exported edge graph (run `offramp export`)")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path} is not valid JSON ({exc}); re-export the edge graph") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise ArtifactError(f"{path} is not an offramp edge-graph manifest (format {manifest.get('format') if isinstance(manifest, dict) else None!r})")
    if manifest.get("format_version") != MANIFEST_FORMAT_VERSION:
        raise ArtifactError(f"{path} has format_version {manifest.get('format_version')!r}; this offramp reads {MANIFEST_FORMAT_VERSION}")
    return manifest


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
