"""The exported edge directory: everything an edge device needs, and `edge.json` saying what is in it.

`offramp export --out DIR` writes it (offramp.models.edge_dir); the edge runs from it with no torch and no
transformers (`offramp edge serve --edge DIR`, `offramp generate --edge DIR`, `LocalEngine(edge=DIR)`):

    DIR/edge.json              this manifest: model identity, exit layer, graphs by precision, head, files
    DIR/graph-fp32/            an edge graph (edge.onnx + its manifest.json, see offramp.shared.edge_manifest)
    DIR/graph-int8/            ... one per exported precision
    DIR/router.json            the calibrated exit rule, when `offramp calibrate` left one for the head
    DIR/exit-k8/router.json    a multi-exit edge (`--exit-layers 8 15`): each early exit's calibrated rule, if any
    DIR/tokenizer/             tokenizer.json, tokenizer_config.json (special tokens), chat_template.jinja

Plain JSON and pathlib, like the graph manifest, so both sides read it without torch.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from offramp.shared.edge_manifest import PRECISIONS, check_manifest, read_format_json
from offramp.shared.errors import ArtifactError
from offramp.shared.exit_rule import ROUTER_FILE

EDGE_DIR_FILE = "edge.json"
EDGE_DIR_FORMAT = "offramp-edge-dir"
EDGE_DIR_FORMAT_VERSION = 1
TOKENIZER_DIR = "tokenizer"
DEFAULT_EXPORT_PRECISIONS = ("q4", "int8", "fp32")  # collaborating, alone, exact


def graph_dir_name(precision: str) -> str:
    return f"graph-{precision}"


@dataclass
class EdgeDirManifest:
    """What `edge.json` holds; `read` validates it and the files it lists."""

    model_name: str  # what the daemon serves it as (`model` in the OpenAI API)
    model_spec: str  # what it was exported from ('default', a checkpoint dir, a .gguf): `--cloud local` loads it
    model_fingerprint: str
    exit_layer: int
    num_layers: int
    hidden_size: int
    vocab_size: int
    max_positions: int
    graphs: dict[str, str]  # precision -> graph dir, relative to the edge dir
    head: dict[str, Any]  # the exit head's identity (kind + its training manifest), as in each graph's manifest
    exit_rule: str | None = None  # ROUTER_FILE when the head was calibrated, else None (max-prob rule)
    head_source: str | None = None  # the trained head's dir at export (informational); None: the final-norm head
    files: dict[str, int] = field(default_factory=dict)  # every other file (relative path -> size)
    offramp_version: str = ""
    format: str = EDGE_DIR_FORMAT
    format_version: int = EDGE_DIR_FORMAT_VERSION
    # Exits before K, in order (a multi-exit edge; empty for one exit, and then not written): each
    # {"exit_layer": k, "head": identity, "exit_rule": "exit-k<k>/router.json" or None, "head_source": dir or None}
    early_exits: list[dict[str, Any]] = field(default_factory=list)

    @property
    def exit_layers(self) -> tuple[int, ...]:
        """Every exit, the split K last."""
        return (*(int(e["exit_layer"]) for e in self.early_exits), self.exit_layer)

    def write(self, edge_dir: Path) -> Path:
        """Write edge.json atomically (a reader never sees half of it)."""
        path = Path(edge_dir) / EDGE_DIR_FILE
        data = asdict(self)
        if not self.early_exits:  # a one-exit directory's edge.json is what it always was
            del data["early_exits"]
        fd, tmp = tempfile.mkstemp(prefix=".edge-", suffix=".json", dir=edge_dir)
        with os.fdopen(fd, "w") as out:
            json.dump(data, out, indent=2)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
        return path

    @classmethod
    def read(cls, edge_dir: Path | str) -> "EdgeDirManifest":
        """Parse and check edge.json, the files it lists and each graph's own manifest; ArtifactError names what is wrong."""
        edge_dir = Path(edge_dir)
        path = edge_dir / EDGE_DIR_FILE
        if not path.is_file():
            hint = " (it holds a single edge graph: export a whole edge directory with `offramp export --out DIR`)" if (edge_dir / "edge.onnx").is_file() else ""
            raise ArtifactError(f"{edge_dir} is not an exported edge directory: no {EDGE_DIR_FILE}{hint}")
        raw = read_format_json(path, EDGE_DIR_FORMAT, EDGE_DIR_FORMAT_VERSION, "edge directory")
        known = set(cls.__dataclass_fields__)
        try:
            manifest = cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as exc:
            raise ArtifactError(f"{path} lacks a field: {exc}") from exc
        manifest._check(edge_dir)
        return manifest

    def _check(self, edge_dir: Path) -> None:
        if not self.graphs:
            raise ArtifactError(f"{edge_dir / EDGE_DIR_FILE} lists no edge graph")
        for precision, rel in self.graphs.items():
            if precision not in PRECISIONS:
                raise ArtifactError(f"{edge_dir / EDGE_DIR_FILE}: graph precision {precision!r} is not one of {PRECISIONS}")
            graph = check_manifest(edge_dir / rel, fingerprint=self.model_fingerprint, exit_layer=self.exit_layer, precision=precision)
            if tuple(graph.get("exit_layers", (self.exit_layer,))) != self.exit_layers:
                raise ArtifactError(f"edge graph {edge_dir / rel} has exits at {graph.get('exit_layers', [self.exit_layer])}, "
                                    f"{EDGE_DIR_FILE} says {list(self.exit_layers)}; export the edge directory again")
        for rel, size in self.files.items():
            path = edge_dir / rel
            if not path.is_file():
                raise ArtifactError(f"{path} is missing (listed in {EDGE_DIR_FILE}); export the edge directory again")
            if path.stat().st_size != size:
                raise ArtifactError(f"{path} is {path.stat().st_size} bytes, {EDGE_DIR_FILE} says {size}: truncated or replaced; export again")
        for rule in [self.exit_rule, *(e.get("exit_rule") for e in self.early_exits)]:
            if rule is not None and rule not in self.files:
                raise ArtifactError(f"{edge_dir / EDGE_DIR_FILE} names exit rule {rule!r} but does not list it among its files")

    @property
    def precisions(self) -> tuple[str, ...]:
        return tuple(p for p in PRECISIONS if p in self.graphs)


def early_exit_rule_dir(exit_layer: int) -> str:
    """Where an early exit's calibrated rule lives in an edge directory (its `router.json`)."""
    return f"exit-k{exit_layer}"
