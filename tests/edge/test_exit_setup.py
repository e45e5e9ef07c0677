"""The edge picks up a trained head and its calibrated threshold by default; flags override; nothing → baseline."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from offramp.edge.assemble import build_edge_runtime, resolve_precision
from offramp.edge.exit_setup import find_trained_head, resolve_exit_setup
from offramp.edge.generation import CollaborativeDecoder, DecodeOptions
from offramp.models.exit_heads import build_head, save_head
from offramp.models.fingerprint import model_fingerprint
from offramp.shared.exit_rule import ExitRule, save_exit_rule
from offramp.models.train_exits import default_head_dir
from offramp.shared.errors import ArtifactError
from tests.conftest import make_tiny_llama

K = 2


@pytest.fixture
def model(tmp_path, monkeypatch):
    monkeypatch.setenv("OFFRAMP_HOME", str(tmp_path / "home"))  # never the machine's real artifacts
    return make_tiny_llama(num_layers=4, seed=21)


def write_head(model, head_dir, threshold: float | None):
    torch.manual_seed(0)
    head = build_head("residual_mlp", model, {"width": 32, "depth": 1})
    for p in head.parameters():
        if p.requires_grad:
            p.data.normal_(0, 0.5)  # visibly different from the final-norm head
    save_head(head, head_dir, {"exit_layer": K, "model_fingerprint": model_fingerprint(model)})
    if threshold is not None:
        rule = ExitRule("logistic", threshold, [1.0, 0, 0, 0, 0, 0], 0.0, [0.0] * 6, [1.0] * 6)
        save_exit_rule(rule, head_dir)
    return head


def test_without_a_trained_head_the_baseline(model) -> None:
    setup = resolve_exit_setup(model, K)
    assert setup.head_dir is None and setup.rule.kind == "max_prob" and setup.threshold == 0.9
    assert setup.threshold_source == "default" and find_trained_head(model, K) is None


def test_the_trained_head_and_its_calibrated_threshold_are_the_default(model) -> None:
    head_dir = default_head_dir(model_fingerprint(model), K)
    write_head(model, head_dir, threshold=0.73)
    setup = resolve_exit_setup(model, K)
    assert setup.head_dir == head_dir and setup.rule.kind == "logistic"
    assert (setup.threshold, setup.threshold_source) == (0.73, "calibrated")
    assert resolve_exit_setup(model, K, threshold=0.5).threshold_source == "flag"
    assert resolve_exit_setup(model, K, use_trained=False).head_dir is None
    assert setup.describe()["head"] == str(head_dir)


def test_a_head_without_calibration_keeps_the_default_threshold(model, tmp_path) -> None:
    write_head(model, tmp_path / "h", threshold=None)
    setup = resolve_exit_setup(model, K, head_dir=tmp_path / "h")
    assert setup.head_dir == tmp_path / "h" and setup.rule.kind == "max_prob" and setup.threshold == 0.9


def test_an_explicit_head_dir_must_hold_a_head(model, tmp_path) -> None:
    with pytest.raises(ArtifactError, match="no exit head"):
        resolve_exit_setup(model, K, head_dir=tmp_path / "nothing-here")


def test_the_runtime_carries_the_trained_head(model, tmp_path) -> None:
    head = write_head(model, tmp_path / "h", threshold=0.6)
    runtime = build_edge_runtime(model, K, "torch", head_dir=tmp_path / "h")
    baseline = build_edge_runtime(model, K, "torch")
    step, base = runtime.run([3, 4, 5]), baseline.run([3, 4, 5])
    assert np.allclose(step.hidden, base.hidden)  # same layers ...
    assert not np.allclose(step.logits, base.logits)  # ... another head
    with torch.inference_mode():
        expected = head(torch.from_numpy(step.hidden[-1:]))[-1].numpy()
    assert np.allclose(step.logits, expected, atol=1e-4)


def test_generate_uses_the_calibrated_rule(model) -> None:
    head_dir = default_head_dir(model_fingerprint(model), K)
    write_head(model, head_dir, threshold=1.5)  # a calibration that never exits
    setup = resolve_exit_setup(model, K)
    decoder = CollaborativeDecoder(build_edge_runtime(model, K, "torch", head_dir=setup.head_dir), None, 4, setup.rule.confidence)

    async def go():
        return [e.source async for e in decoder.stream([1, 2, 3], DecodeOptions(max_new_tokens=5, threshold=setup.threshold))]

    assert asyncio.run(go()) == ["edge"] * 5  # no cloud: standalone still emits
    assert setup.rule.confidence(np.zeros(128, np.float32)) < setup.threshold


def test_auto_precision_is_q4_when_collaborating() -> None:
    assert resolve_precision("auto", "none") == "int8"
    assert resolve_precision("auto", "local") == "q4" and resolve_precision("auto", "ws://h:1") == "q4"
    assert resolve_precision("torch", "local") == "torch"
