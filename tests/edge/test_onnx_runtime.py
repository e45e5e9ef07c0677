"""OnnxEdgeRuntime against the PyTorch edge part: chunked prefill + decode steps, rollback, int8 agreement."""

from __future__ import annotations

import numpy as np
import pytest

from offramp.edge.onnx_runtime import OnnxEdgeRuntime
from offramp.models.edge_dir import ensure_edge_graph
from offramp.models.reference_runtime import TorchEdgeRuntime
from offramp.models.export import export_edge
from offramp.models.split import EdgePart
from offramp.shared.errors import ArtifactError
from tests.models.test_export import TINY_K, default_graphs, tiny_graphs  # noqa: F401  (session fixtures)

# A prefill chunk, single-token steps, then another multi-token chunk.
SCHEDULE = [17, 1, 1, 1, 1, 6]


def compare(onnx_rt: OnnxEdgeRuntime, torch_rt: TorchEdgeRuntime, ids: list[int], schedule: list[int]) -> tuple[float, float]:
    """Max abs diff of hidden states and exit logits over the schedule (both runtimes fed the same chunks)."""
    worst_hidden = worst_logits = 0.0
    start = 0
    for n in schedule:
        a, b = onnx_rt.run(ids[start:start + n]), torch_rt.run(ids[start:start + n])
        assert a.hidden.shape == b.hidden.shape == (n, onnx_rt.hidden_size)
        assert a.logits.shape == b.logits.shape == (onnx_rt.vocab_size,)
        worst_hidden = max(worst_hidden, float(np.abs(a.hidden - b.hidden).max()))
        worst_logits = max(worst_logits, float(np.abs(a.logits - b.logits).max()))
        start += n
    assert onnx_rt.length == torch_rt.length == start
    return worst_hidden, worst_logits


def test_fp32_matches_torch_on_tiny_model(tiny_graphs, tiny_model) -> None:
    ids = np.random.default_rng(0).integers(0, 128, sum(SCHEDULE)).tolist()
    hidden, logits = compare(OnnxEdgeRuntime(tiny_graphs["fp32"]), TorchEdgeRuntime(EdgePart(tiny_model, TINY_K)), ids, SCHEDULE)
    print(f"\ntiny fp32: max |dhidden| {hidden:.2e}, max |dlogits| {logits:.2e}")
    assert hidden < 1e-4 and logits < 1e-4


def test_truncate_then_rerun_equals_fresh_run(tiny_graphs) -> None:
    ids = np.random.default_rng(1).integers(0, 128, 30).tolist()
    rt = OnnxEdgeRuntime(tiny_graphs["fp32"])
    rt.run(ids[:20])
    rt.run([5])
    rt.run([9, 9, 9])
    rt.truncate(20)
    assert rt.length == 20
    rolled = [rt.run(ids[20:25]), rt.run([ids[25]])]
    fresh_rt = OnnxEdgeRuntime(tiny_graphs["fp32"])
    fresh_rt.run(ids[:20])
    fresh = [fresh_rt.run(ids[20:25]), fresh_rt.run([ids[25]])]
    for a, b in zip(rolled, fresh):
        np.testing.assert_allclose(a.hidden, b.hidden, atol=1e-6)
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-6)
    rt.reset()
    assert rt.length == 0
    np.testing.assert_allclose(rt.run(ids[:20]).logits, OnnxEdgeRuntime(tiny_graphs["fp32"]).run(ids[:20]).logits, atol=1e-6)
    with pytest.raises(ValueError, match="cannot truncate to 21"):
        rt.truncate(21)


def test_context_length_and_empty_input_are_refused(tiny_graphs, tiny_model) -> None:
    rt = OnnxEdgeRuntime(tiny_graphs["fp32"])
    with pytest.raises(ValueError, match="at least one token"):
        rt.run([])
    with pytest.raises(ValueError, match="exceed the context length 256"):
        rt.run([1] * 257)


def test_runtime_refuses_mismatched_graph(tiny_graphs) -> None:
    with pytest.raises(ArtifactError, match="exit_layer=2, expected 5"):
        OnnxEdgeRuntime(tiny_graphs["fp32"], exit_layer=5)
    with pytest.raises(ArtifactError, match="model_fingerprint"):
        OnnxEdgeRuntime(tiny_graphs["fp32"], fingerprint="0" * 64)


def test_corrupt_graph_is_an_artifact_error(tiny_graphs, tmp_path) -> None:
    import json
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_graphs["fp32"], bad)
    size = (bad / "edge.onnx").stat().st_size
    (bad / "edge.onnx").write_bytes(b"\x00garbage" * (size // 8) + b"\x00" * (size % 8))
    with pytest.raises(ArtifactError, match="ONNX Runtime cannot load"):
        OnnxEdgeRuntime(bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    (bad / "edge.onnx").unlink()
    with pytest.raises(ArtifactError, match="edge.onnx is missing"):
        OnnxEdgeRuntime(bad)
    assert manifest["exit_layer"] == TINY_K


def test_ensure_edge_graph_reuses_and_reexports(tmp_path, default_model) -> None:
    from tests.conftest import make_tiny_llama

    checkpoint = tmp_path / "ckpt"
    make_tiny_llama(num_layers=4, seed=5, cpu_layout=False).save_pretrained(checkpoint)
    default_model[1].save_pretrained(checkpoint)
    out = tmp_path / "graph"
    first = ensure_edge_graph(str(checkpoint), 2, "fp32", out_dir=out, progress=False)
    mtime = (first / "edge.onnx").stat().st_mtime_ns
    assert ensure_edge_graph(str(checkpoint), 2, "fp32", out_dir=out, progress=False) == first
    assert (first / "edge.onnx").stat().st_mtime_ns == mtime
    ensure_edge_graph(str(checkpoint), 3, "fp32", out_dir=out, progress=False)  # K changed: re-export in place
    assert OnnxEdgeRuntime(out).exit_layer == 3


@pytest.mark.slow
def test_fp32_matches_torch_on_default_model_k10(default_graphs, default_model) -> None:
    model, tokenizer = default_model
    ids = tokenizer("The quick brown fox jumps over the lazy dog, and then the dog wakes up and chases it.")["input_ids"]
    ids = (ids * 3)[: sum(SCHEDULE)]
    hidden, logits = compare(OnnxEdgeRuntime(default_graphs["fp32"]), TorchEdgeRuntime(EdgePart(model, 10)), ids, SCHEDULE)
    print(f"\ndefault K=10 fp32: max |dhidden| {hidden:.2e}, max |dlogits| {logits:.2e}")
    assert hidden < 5e-3 and logits < 5e-3


@pytest.mark.slow
def test_int8_top1_agrees_with_fp32_on_real_text(default_graphs, default_model) -> None:
    _, tokenizer = default_model
    text = (
        "Large language models are usually served from data centres, but many tokens in a reply are easy to predict. "
        "An edge device can run the first few layers of the network and stop early when its exit head is confident, "
        "sending only the hard tokens to the cloud. The cloud keeps the key-value cache of the deep layers for every "
        "conversation, so an escalated token costs one step of the remaining layers rather than a full forward pass. "
        "This splits the work between a phone or a laptop and a server, saves bandwidth, and keeps latency low when "
        "the network is slow. The quality of the result depends on how well the early exit agrees with the full model, "
        "which is measured on real text before a threshold is chosen for deployment on each class of device."
    )
    ids = tokenizer(text + " " + text.lower())["input_ids"][:300]  # ~300 steps; the second pass is lower-cased
    fp32, int8 = OnnxEdgeRuntime(default_graphs["fp32"]), OnnxEdgeRuntime(default_graphs["int8"])
    fp32.run(ids[:1]), int8.run(ids[:1])
    agree, rel = [], []
    for token in ids[1:]:
        a, b = fp32.run([token]), int8.run([token])
        agree.append(a.logits.argmax() == b.logits.argmax())
        rel.append(np.linalg.norm(a.hidden - b.hidden) / np.linalg.norm(a.hidden))
    rate = float(np.mean(agree))
    print(f"\nint8 vs fp32 over {len(agree)} steps: top-1 agreement {rate:.3f}, median hidden rel err {np.median(rel):.4f}")
    assert len(agree) >= 250
    assert rate >= 0.85
