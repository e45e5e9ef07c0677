"""Export bakes in the trained head and copies its calibrated rule; the edge runs them by default; flags override;
nothing -> the final-norm head with max-prob at 0.9."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from offramp.edge.exit_setup import UNTRAINED_HEAD, resolve_exit_setup
from offramp.edge.decode_loop import CollaborativeDecoder, DecodeOptions
from offramp.edge.onnx_runtime import OnnxEdgeRuntime
from offramp.edge.precision import resolve_precision
from offramp.models import load_model
from offramp.models.edge_dir import ensure_edge_dir, export_edge_dir, pick_head
from offramp.models.exit_heads import build_head, save_head
from offramp.models.fingerprint import model_fingerprint
from offramp.models.reference_runtime import reference_runtime
from offramp.models.train_exits import default_head_dir
from offramp.shared.edge_dir import EdgeDirManifest
from offramp.shared.errors import ArtifactError
from offramp.shared.exit_rule import ExitRule, save_exit_rule
from tests.conftest import save_tiny_checkpoint

K = 2


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFRAMP_HOME", str(tmp_path / "home"))  # never the machine's real artifacts
    checkpoint = save_tiny_checkpoint(tmp_path / "ckpt", num_layers=4, seed=21)
    return str(checkpoint), load_model(str(checkpoint))


def write_head(model, head_dir, threshold: float | None):
    torch.manual_seed(0)
    head = build_head("residual_mlp", model, {"width": 32, "depth": 1})
    for p in head.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.5)  # visibly different from the final-norm head
    save_head(head, head_dir, {"exit_layer": K, "model_fingerprint": model_fingerprint(model)})
    if threshold is not None:
        save_exit_rule(ExitRule("logistic", threshold, [1.0, 0, 0, 0, 0, 0], 0.0, [0.0] * 6, [1.0] * 6), head_dir)
    return head


def setup_of(edge_dir, threshold=None):
    return resolve_exit_setup(edge_dir, EdgeDirManifest.read(edge_dir), threshold)


def test_without_a_trained_head_the_baseline(tiny) -> None:
    spec, (model, tokenizer) = tiny
    assert pick_head(model, K, None, use_trained=True) is None
    edge_dir, _ = ensure_edge_dir(spec, K, ["fp32"], loaded=(model, tokenizer), progress=False)
    setup = setup_of(edge_dir)
    assert setup.head == UNTRAINED_HEAD and setup.rule.kind == "max_prob" and setup.threshold == 0.9
    assert setup.threshold_source == "default" and EdgeDirManifest.read(edge_dir).exit_rule is None


def test_the_trained_head_and_its_calibrated_threshold_are_the_default(tiny) -> None:
    spec, (model, tokenizer) = tiny
    head_dir = default_head_dir(model_fingerprint(model), K)
    write_head(model, head_dir, threshold=0.73)
    edge_dir, _ = ensure_edge_dir(spec, K, ["fp32"], loaded=(model, tokenizer), progress=False)
    setup = setup_of(edge_dir)
    assert setup.head == str(head_dir) and setup.rule.kind == "logistic"
    assert (setup.threshold, setup.threshold_source) == (0.73, "calibrated")
    assert setup_of(edge_dir, threshold=0.5).threshold_source == "flag"
    assert EdgeDirManifest.read(edge_dir).head["kind"] == "residual_mlp"
    plain, _ = ensure_edge_dir(spec, K, ["fp32"], use_trained=False, loaded=(model, tokenizer), progress=False)
    assert plain != edge_dir and setup_of(plain).head == UNTRAINED_HEAD
    # a new calibration reaches the cached edge directory without a re-export of the graph
    graph = edge_dir / "graph-fp32" / "edge.onnx"
    mtime = graph.stat().st_mtime_ns
    save_exit_rule(ExitRule("logistic", 0.61, [1.0, 0, 0, 0, 0, 0], 0.0, [0.0] * 6, [1.0] * 6), head_dir)
    again, _ = ensure_edge_dir(spec, K, ["fp32"], loaded=(model, tokenizer), progress=False)
    assert again == edge_dir and setup_of(again).threshold == 0.61 and graph.stat().st_mtime_ns == mtime


def test_a_head_without_calibration_keeps_the_default_threshold(tiny, tmp_path) -> None:
    spec, (model, tokenizer) = tiny
    write_head(model, tmp_path / "h", threshold=None)
    edge_dir = export_edge_dir(model, tokenizer, spec, K, tmp_path / "edge", ["fp32"], tmp_path / "h", progress=False)
    setup = setup_of(edge_dir)
    assert setup.head == str(tmp_path / "h") and setup.rule.kind == "max_prob" and setup.threshold == 0.9


def test_an_explicit_head_dir_must_hold_a_head(tiny, tmp_path) -> None:
    _, (model, _) = tiny
    with pytest.raises(ArtifactError, match="no exit head"):
        pick_head(model, K, tmp_path / "nothing-here", use_trained=True)


def test_the_exported_graph_carries_the_trained_head(tiny, tmp_path) -> None:
    spec, (model, tokenizer) = tiny
    head = write_head(model, tmp_path / "h", threshold=0.6)
    trained = export_edge_dir(model, tokenizer, spec, K, tmp_path / "trained", ["fp32"], tmp_path / "h", progress=False)
    plain = export_edge_dir(model, tokenizer, spec, K, tmp_path / "plain", ["fp32"], None, progress=False)
    runtime, baseline = OnnxEdgeRuntime(trained / "graph-fp32"), OnnxEdgeRuntime(plain / "graph-fp32")
    step, base = runtime.run([3, 4, 5]), baseline.run([3, 4, 5])
    assert np.allclose(step.hidden, base.hidden, atol=1e-5)  # same layers ...
    assert not np.allclose(step.logits, base.logits)  # ... another head
    reference = reference_runtime(model, K, head).run([3, 4, 5])
    np.testing.assert_allclose(step.logits, reference.logits, atol=1e-4)


def test_generate_uses_the_calibrated_rule(tiny, tmp_path) -> None:
    spec, (model, tokenizer) = tiny
    write_head(model, tmp_path / "h", threshold=1.5)  # a calibration that never exits
    edge_dir = export_edge_dir(model, tokenizer, spec, K, tmp_path / "edge", ["fp32"], tmp_path / "h", progress=False)
    setup = setup_of(edge_dir)
    decoder = CollaborativeDecoder(OnnxEdgeRuntime(edge_dir / "graph-fp32"), None, 4, setup.rule.confidence)

    async def go():
        return [e.source async for e in decoder.stream([1, 2, 3], DecodeOptions(max_new_tokens=5, threshold=setup.threshold))]

    assert asyncio.run(go()) == ["edge"] * 5  # no cloud: standalone still emits
    assert setup.rule.confidence(np.zeros(128, np.float32)) < setup.threshold


def test_auto_precision_is_q4_when_collaborating() -> None:
    assert resolve_precision("auto", "none") == "int8"
    assert resolve_precision("auto", "local") == "q4" and resolve_precision("auto", "ws://h:1") == "q4"
    assert resolve_precision("auto", "local", ["fp32", "int8"]) == "fp32"  # no q4 graph: the exact one
    assert resolve_precision("auto", "local", ["int8"]) == "int8"  # a directory with one graph runs it
    assert resolve_precision("auto", "none", ["fp32", "q4"]) == "q4"  # alone without int8: any graph serves
    assert resolve_precision("auto", "none", ["fp32"]) == "fp32"
    with pytest.raises(ArtifactError, match="does not hold"):
        resolve_precision("int8", "none", ["fp32"])
