"""The exported edge graph: I/O contract, manifest, int8 size, and the `offramp export` command."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

from offramp.models.export import export_edge
from offramp.shared.edge_manifest import GRAPH_FILE, MANIFEST_FILE, check_manifest, io_names
from offramp.shared.cli import main
from offramp.shared.errors import ArtifactError
from tests.conftest import make_tiny_llama

TINY_K = 2


@pytest.fixture(scope="session")
def tiny_graphs(tmp_path_factory, tiny_model) -> dict[str, object]:
    """fp32 and int8 edge graphs of the tiny model at K=2."""
    root = tmp_path_factory.mktemp("tiny-edge")
    return {p: export_edge(tiny_model, TINY_K, root / p, p, progress=False) for p in ("fp32", "int8")}


@pytest.fixture(scope="session")
def default_graphs(tmp_path_factory, default_model) -> dict[str, object]:
    """fp32 and int8 edge graphs of the default model at K=10 (~1 min to export on 2 cores)."""
    root = tmp_path_factory.mktemp("default-edge")
    model, _ = default_model
    return {p: export_edge(model, 10, root / p, p, progress=False) for p in ("fp32", "int8")}


def test_graph_io_names_and_symbolic_dims(tiny_graphs) -> None:
    graph = onnx.load(str(tiny_graphs["fp32"] / GRAPH_FILE), load_external_data=False)
    ins, outs = io_names(TINY_K)
    assert [i.name for i in graph.graph.input] == ins
    assert [o.name for o in graph.graph.output] == outs
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
    assert dims["input_ids"] == [1, "seq"]
    assert dims["past_key_0"] == [1, 2, "past_len", 16]
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17


def test_manifest_records_identity_and_files(tiny_graphs, tiny_model) -> None:
    from offramp.models import model_fingerprint

    manifest = json.loads((tiny_graphs["int8"] / MANIFEST_FILE).read_text())
    assert manifest["model_fingerprint"] == model_fingerprint(tiny_model)
    assert (manifest["exit_layer"], manifest["precision"], manifest["hidden_size"], manifest["vocab_size"]) == (TINY_K, "int8", 64, 128)
    assert manifest["head"]["kind"] == "final_norm"
    assert manifest["files"][GRAPH_FILE] == (tiny_graphs["int8"] / GRAPH_FILE).stat().st_size
    assert [o["name"] for o in manifest["outputs"]][:2] == ["exit_logits", "hidden"]
    assert manifest["outputs"][1]["shape"] == [1, "seq", 64]


def test_manifest_mismatch_and_damage_are_artifact_errors(tiny_graphs, tmp_path) -> None:
    with pytest.raises(ArtifactError, match="exit_layer=2, expected 3"):
        check_manifest(tiny_graphs["fp32"], exit_layer=3)
    with pytest.raises(ArtifactError, match="precision='fp32', expected 'int8'"):
        check_manifest(tiny_graphs["fp32"], precision="int8")
    with pytest.raises(ArtifactError, match="no manifest.json"):
        check_manifest(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    manifest = json.loads((tiny_graphs["fp32"] / MANIFEST_FILE).read_text())
    (broken / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="edge.onnx is missing"):
        check_manifest(broken)
    (broken / GRAPH_FILE).write_bytes(b"truncated")
    with pytest.raises(ArtifactError, match="truncated or replaced"):
        check_manifest(broken)
    (broken / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        check_manifest(broken)


def test_untied_model_exports_and_quantizes(tmp_path) -> None:
    model = make_tiny_llama(num_layers=3, seed=4, tie_word_embeddings=False)
    out = export_edge(model, 1, tmp_path / "untied", "int8", progress=False)
    applied = check_manifest(out, exit_layer=1, precision="int8")["quantization"]["applied"]
    assert applied == {"gather8": 1, "nbits8-b32-acc4": 7 + 1}  # K=1: 7 layer MatMuls; an untied LM head has its own bytes


def test_cli_export_end_to_end(tmp_path, capsys, default_model) -> None:
    checkpoint = tmp_path / "ckpt"
    make_tiny_llama(num_layers=4, seed=3, cpu_layout=False).save_pretrained(checkpoint)
    default_model[1].save_pretrained(checkpoint)  # load_model wants a tokenizer beside the weights
    out = tmp_path / "edge"
    assert main(["export", "--model", str(checkpoint), "--exit-layer", "2", "--out", str(out), "--precision", "fp32"]) == 0
    assert str(out) in capsys.readouterr().out
    graph_dir = out / "graph-fp32"  # an edge directory (offramp.shared.edge_dir) holding the graph
    manifest = check_manifest(graph_dir, exit_layer=2, precision="fp32")
    mtime = (graph_dir / GRAPH_FILE).stat().st_mtime_ns
    assert main(["export", "--model", str(checkpoint), "--exit-layer", "2", "--out", str(out), "--precision", "fp32"]) == 0
    assert (graph_dir / GRAPH_FILE).stat().st_mtime_ns == mtime, "a matching graph must not be re-exported"
    assert main(["export", "--model", str(checkpoint), "--exit-layer", "9", "--out", str(out)]) == 2
    assert "exit layer 9 is out of range" in capsys.readouterr().err
    assert manifest["head"]["kind"] == "final_norm"


@pytest.mark.slow
def test_default_int8_graph_is_at_most_35_percent_of_fp32(default_graphs) -> None:
    fp32 = (default_graphs["fp32"] / GRAPH_FILE).stat().st_size
    int8 = (default_graphs["int8"] / GRAPH_FILE).stat().st_size
    print(f"\nK=10 edge graph: fp32 {fp32 / 1e6:.1f} MB, int8 {int8 / 1e6:.1f} MB ({int8 / fp32:.1%})")
    assert int8 <= 0.35 * fp32
