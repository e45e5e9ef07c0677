"""Several exits on the edge (`--exit-layers`): a token confident at an earlier exit skips the edge's remaining
layers, whose KV is filled on the next step (or on demand) so that every state equals a single full run's; the
decode loop verifies early drafts like any other, counts exits by layer, and rolls pending positions back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from offramp.cloud.full_model import FullModelRunner
from offramp.cloud.local_link import local_link as build_local_link
from offramp.edge.decode_loop import CLOUD, EDGE, CollaborativeDecoder, DecodeOptions
from offramp.edge.multi_exit import ExitGate, open_edge_runtime
from offramp.models.export import export_multi_exit
from offramp.models.reference_runtime import TorchEdgeRuntime, reference_multi_exit_runtime, reference_runtime
from offramp.shared.errors import SplitConfigError
from offramp.shared.exit_layers import check_exit_layers
from tests.conftest import make_tiny_llama

EXITS = (2, 4)  # early exit at 2, the split K = 4 (of 6 layers)
K = EXITS[-1]
PROMPT = [5, 17, 3, 99, 42, 8]
N = 16

ALWAYS = ExitGate(lambda logits, hidden: 1.0, 0.0)  # threshold 0: every single-token step leaves at the early exit
NEVER = ExitGate(lambda logits, hidden: 0.0, 0.5)


def every_other(logits, hidden) -> float:
    """A deterministic mix (a function of the early exit's outputs only, so two runtimes decide alike)."""
    return float(int(abs(float(hidden[0])) * 1e4) % 2 == 0)


MIXED = ExitGate(every_other, 0.5)


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(num_layers=6, seed=3)


def kv_of(runtime) -> list[np.ndarray]:
    """Every edge layer's K and V as arrays, in layer order (a multi-exit runtime's segments concatenated)."""
    pasts = runtime._past if hasattr(runtime, "segments") else [runtime._past]
    return [t.numpy() if isinstance(t, torch.Tensor) else t for past in pasts for kv in past for t in kv]


def assert_same_state(multi, full) -> None:
    assert multi.length == full.length and multi.pending == 0
    for a, b in zip(kv_of(multi), kv_of(full), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_skipped_positions_filled_later_equal_a_single_full_run_also_after_truncate(model) -> None:
    ids = np.random.default_rng(0).integers(0, 128, 30).tolist()
    full = reference_runtime(model, K)
    reference = full.run(ids).hidden
    multi = reference_multi_exit_runtime(model, EXITS, [ALWAYS])
    rows = [multi.run(ids[:8]).hidden]  # a prefill chunk always runs to K
    for token in ids[8:13]:  # five early exits: the layers past 2 wait
        step = multi.run([token])
        assert (step.exit_layer, len(step.hidden)) == (2, 0)
    assert multi.pending == 5
    multi.gates = [NEVER]
    step = multi.run([ids[13]])  # goes to K: the five waiting positions are filled in the same call
    assert step.exit_layer == K and step.pending == 0 and len(step.hidden) == 6
    rows.append(step.hidden)
    multi.gates = [MIXED]
    for token in ids[14:]:
        rows.append(multi.run([token]).hidden)
    rows.append(multi.fill())
    np.testing.assert_allclose(np.concatenate(rows), reference, atol=1e-5)
    assert_same_state(multi, full)

    multi.gates = [ALWAYS]
    for token in ids[:4]:  # pending positions, then a rollback into them and below
        multi.run([token])
    multi.truncate(full.length - 3)
    full.truncate(full.length - 3)
    assert multi.length == full.length
    multi.fill()
    assert_same_state(multi, full)
    multi.gates = [MIXED]
    again = [multi.run([t]).hidden for t in ids[5:12]] + [multi.fill()]
    np.testing.assert_allclose(np.concatenate(again), full.run(ids[5:12]).hidden, atol=1e-5)
    assert_same_state(multi, full)


def test_the_exported_segment_graphs_equal_the_pytorch_segments(model, tmp_path) -> None:
    graph_dir = export_multi_exit(model, EXITS, tmp_path / "graph", "fp32", progress=False)
    manifest = json.loads((graph_dir / "manifest.json").read_text())
    assert manifest["exit_layer"] == K and manifest["exit_layers"] == list(EXITS)
    assert [(s["first_layer"], s["exit_layer"]) for s in manifest["segments"]] == [(0, 2), (2, 4)]
    onnx_rt = open_edge_runtime(graph_dir, [MIXED])
    torch_rt = reference_multi_exit_runtime(model, EXITS, [MIXED])
    ids = np.random.default_rng(1).integers(0, 128, 24).tolist()
    a, b = onnx_rt.run(ids[:6]), torch_rt.run(ids[:6])
    np.testing.assert_allclose(a.hidden, b.hidden, atol=1e-4)
    for token in ids[6:]:
        a, b = onnx_rt.run([token]), torch_rt.run([token])
        assert (a.exit_layer, a.pending, len(a.hidden)) == (b.exit_layer, b.pending, len(b.hidden))
        np.testing.assert_allclose(a.logits, b.logits, atol=1e-4)
        np.testing.assert_allclose(a.hidden, b.hidden, atol=1e-4)
    np.testing.assert_allclose(onnx_rt.fill(), torch_rt.fill(), atol=1e-4)


class Recording:
    """The in-process link, keeping every request so the uploaded layer-K rows can be checked."""

    def __init__(self, inner) -> None:
        self.inner, self.requests = inner, []
        self.codec, self.deep_layers, self.stats = inner.codec, inner.deep_layers, inner.stats

    async def open_session(self, sid):
        await self.inner.open_session(sid)

    async def extend(self, request):
        self.requests.append(request)
        return await self.inner.extend(request)

    async def close_session(self, sid):
        await self.inner.close_session(sid)

    async def aclose(self):
        await self.inner.aclose()


async def generate(model, gate, options, link=True):
    runtime = reference_multi_exit_runtime(model, EXITS, [gate])
    recording = Recording(build_local_link(model, K, "fp32")) if link else None
    decoder = CollaborativeDecoder(runtime, recording, model.config.num_hidden_layers)
    events = [e async for e in decoder.stream(PROMPT, options)]
    return [e.token_id for e in events], [e.source for e in events], decoder.stats, recording, runtime


@pytest.mark.parametrize("gate", [ALWAYS, MIXED], ids=["always-early", "mixed"])
@pytest.mark.parametrize("depth", [0, 1, 4], ids=["adaptive", "fixed1", "fixed4"])
async def test_lossless_greedy_with_two_exits_is_exactly_the_full_model(model, gate, depth) -> None:
    tokens, sources, stats, link, _ = await generate(model, gate, DecodeOptions(max_new_tokens=N, fixed_draft=depth))
    assert tokens == list(FullModelRunner(model).generate_ids(PROMPT, N)) and set(sources) == {CLOUD}
    assert set(stats.exits_by_layer) <= {"2", "4"} and sum(stats.exits_by_layer.values()) == stats.accepted_drafts
    if gate is ALWAYS:
        assert stats.exits_by_layer.get("2", 0) > 0
    rows = {}  # what went up: the layer-K state of every position, filled before its block was uploaded
    for request in link.requests:
        for i, row in enumerate(np.asarray(request.hidden)):
            rows[request.start + i] = row
    sequence = PROMPT + tokens[:-1]
    full = TorchEdgeRuntime(reference_runtime(model, K).edge).run(sequence).hidden
    for position, row in rows.items():
        if position < len(sequence):
            np.testing.assert_allclose(row, full[position], atol=1e-5)


async def test_exit_mode_counts_exits_by_layer_and_forced_early_exits_keep_the_layer_k_states(model) -> None:
    options = DecodeOptions(max_new_tokens=N, threshold=2.0, lossless=False)  # K's drafts never exit
    tokens, sources, stats, _, runtime = await generate(model, ALWAYS, options)
    assert sources[0] == CLOUD and sources[1:] == [EDGE] * (N - 1)  # the first draft comes from the prefill, at K
    assert stats.edge_exits == N - 1 and stats.exits_by_layer["2"] == N - 1
    assert stats.exits_by_layer.get("4", 0) == (stats.accepted_drafts == 1)
    early_head = TorchEdgeRuntime(reference_runtime(model, 2).edge)  # each exited token is layer 2's greedy guess
    step = early_head.run(PROMPT + tokens[:1])
    for token in tokens[1:]:
        assert token == int(np.argmax(step.logits))
        step = early_head.run([token])
    runtime.fill()
    full = reference_runtime(model, K)
    full.run(PROMPT + tokens[:-1])
    assert_same_state(runtime, full)


async def test_edge_standalone_with_a_mixed_gate_runs_layer_2_or_4_per_token(model) -> None:
    tokens, sources, stats, _, _ = await generate(model, MIXED, DecodeOptions(max_new_tokens=N), link=False)
    assert set(sources) == {EDGE} and stats.edge_fills == 0  # alone, nobody needs the skipped layers' states
    assert stats.exits_by_layer.get("2", 0) + stats.exits_by_layer.get("4", 0) == N


@pytest.mark.parametrize(
    "layers, words",
    [((4, 2), "must increase: 2 follows 4"), ((2, 2, 4), "exit layer 2 appears twice"), ((2, 6), "exit layer 6 .* out of range"),
     ((0, 4), "exit layer 0 .* must be an int >= 1"), ((), "at least one")],
)
def test_bad_exit_layer_lists_are_refused_naming_the_value(model, layers, words, tmp_path) -> None:
    with pytest.raises(SplitConfigError, match=words):
        check_exit_layers(layers, model.config.num_hidden_layers)
    if len(layers) >= 2:
        with pytest.raises(SplitConfigError, match=words):
            reference_multi_exit_runtime(model, layers, [NEVER] * (len(layers) - 1))
        with pytest.raises(SplitConfigError, match=words):
            export_multi_exit(model, layers, tmp_path / "graph", progress=False)


def test_edge_config_refuses_a_bad_list() -> None:
    from offramp.edge.config import EdgeConfig, ServiceConfigError

    with pytest.raises(ServiceConfigError, match="must increase: 8 follows 15"):
        EdgeConfig(exit_layer=8, early_exits=(15,))


def test_generate_with_exit_layers_exports_a_multi_exit_edge_and_reports_exits_by_layer(tmp_path, monkeypatch, capsys) -> None:
    """`offramp generate --model DIR --exit-layers 1 3`: the head train-exits left at layer 1 (its router.json:
    threshold 0, so every decode step leaves there) is exported as the early exit; lossless output is the full
    model's, exit mode emits the early drafts itself, and both report exits_by_layer."""
    from offramp.models import load_model
    from offramp.models.exit_heads import build_head, save_head
    from offramp.models.fingerprint import model_fingerprint
    from offramp.models.train_exits import default_head_dir
    from offramp.shared.cli import main
    from offramp.shared.exit_rule import ExitRule, save_exit_rule
    from tests.conftest import save_tiny_checkpoint

    monkeypatch.setenv("OFFRAMP_HOME", str(tmp_path / "home"))
    checkpoint = str(save_tiny_checkpoint(tmp_path / "ckpt", num_layers=4, seed=5))
    model, _ = load_model(checkpoint)
    head_dir = default_head_dir(model_fingerprint(model), 1)
    torch.manual_seed(0)
    save_head(build_head("residual_mlp", model, {"width": 16, "depth": 1}), head_dir, {"exit_layer": 1, "model_fingerprint": model_fingerprint(model)})
    save_exit_rule(ExitRule("max_prob", 0.0), head_dir)

    def generate(*flags: str) -> dict:
        argv = ["generate", "--model", checkpoint, "--prompt", "t1 t2 t3 t9", "--max-new-tokens", "10", "--json", *flags]
        assert main(argv) == 0
        return json.loads(capsys.readouterr().out)

    common = ("--exit-layers", "1", "3", "--cloud", "local", "--codec", "fp32", "--edge-precision", "fp32")
    lossless = generate(*common)
    assert lossless["exit_layers"] == [1, 3] and lossless["exit_layer"] == 3
    assert lossless["early_exits"] == [{"exit_layer": 1, "head": str(head_dir), "rule": "max_prob", "threshold": 0.0, "threshold_source": "calibrated"}]
    assert lossless["token_ids"] == generate("--cloud-only")["token_ids"]
    assert lossless["stats"]["exits_by_layer"].get("1", 0) > 0 and lossless["stats"]["edge_fills"] > 0
    exits = generate(*common, "--no-lossless", "--threshold", "2")
    assert exits["sources"][1:] == [EDGE] * 9 and exits["stats"]["exits_by_layer"]["1"] == 9
    assert main(["export", "--model", checkpoint, "--exit-layers", "3", "3", "--out", str(tmp_path / "bad")]) != 0
    assert "exit layer 3 appears twice in [3, 3]" in capsys.readouterr().err
