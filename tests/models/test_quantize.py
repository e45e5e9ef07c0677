"""Quantized edge graphs: recipes by module role, lossless 4-bit storage, the manifest record, and fidelity.

Tiny random models where the weights are not the point; a tiny model snapped onto GGUF's grids (Q4_1 layers,
Q8_0 embedding, as the default model's file) for the lossless path; the real default model for the
teacher-forced agreement that decides the collaborative default.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from offramp.edge.onnx_runtime import OnnxEdgeRuntime
from offramp.models.export import export_edge
from offramp.models.quantize import (
    CANDIDATES,
    RECIPES,
    GRID_BLOCK,
    QuantizationError,
    Recipe,
    Scheme,
    block4,
    block8_rows,
    module_path,
    nbits,
    quantize_edge_dir,
    weight_nodes,
)
from offramp.shared.edge_manifest import GRAPH_FILE, MANIFEST_FILE, PRECISIONS, check_manifest
from tests.conftest import make_tiny_llama

K = 2
SCHEDULE = [17, 1, 1, 1, 1, 6]  # a prefill chunk, decode steps, another chunk


def snap_to_gguf_grids(model: torch.nn.Module) -> torch.nn.Module:
    """Round the decoder's Linear weights to Q4_1 blocks and the embedding to Q8_0 blocks (fp16 scales), in place."""
    with torch.no_grad():
        for layer in model.model.layers:
            for linear in [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]:
                w = linear.weight  # [out, in]: GGUF blocks run along `in`
                blocks = w.reshape(w.shape[0], -1, GRID_BLOCK)
                lo = blocks.amin(-1, keepdim=True).half().float()
                step = ((blocks.amax(-1, keepdim=True) - lo) / 15).half().float()
                q = torch.clamp(torch.round((blocks - lo) / step), 0, 15)
                w.copy_((q * step + lo).reshape(w.shape))
        table = model.model.embed_tokens.weight
        blocks = table.reshape(table.shape[0], -1, GRID_BLOCK)
        scale = (blocks.abs().amax(-1, keepdim=True) / 127).half().float()
        table.copy_((torch.clamp(torch.round(blocks / scale), -127, 127) * scale).reshape(table.shape))
    return model


@pytest.fixture(scope="module")
def grid_graphs(tmp_path_factory) -> dict:
    """fp32 / q4 / int8 graphs of a tiny model whose weights lie on GGUF's grids, at K=2."""
    root = tmp_path_factory.mktemp("grid-edge")
    model = snap_to_gguf_grids(make_tiny_llama(seed=7))
    return {p: export_edge(model, K, root / p, p, progress=False) for p in ("fp32", "q4", "int8")}


@pytest.fixture(scope="module")
def random_graphs(tmp_path_factory) -> dict:
    """fp32 / q4 graphs of a tiny random model (off every grid)."""
    root = tmp_path_factory.mktemp("random-edge")
    model = make_tiny_llama(seed=8)
    return {p: export_edge(model, K, root / p, p, progress=False) for p in ("fp32", "q4")}


def run_schedule(graph_dir, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Layer-K states of every position and the exit logits after each chunk, fed as SCHEDULE."""
    rt = OnnxEdgeRuntime(graph_dir)
    states, logits, start = [], [], 0
    for n in SCHEDULE:
        step = rt.run(ids[start:start + n])
        states.append(step.hidden)
        logits.append(step.logits)
        start += n
    return np.concatenate(states), np.stack(logits)


IDS = np.random.default_rng(0).integers(0, 128, sum(SCHEDULE)).tolist()


def test_precisions_are_the_shipped_recipes() -> None:
    assert set(PRECISIONS) == {"fp32", *RECIPES}
    assert all(name in CANDIDATES for name in RECIPES)


def test_q4_is_lossless_on_a_gguf_grid_checkpoint(grid_graphs) -> None:
    record = check_manifest(grid_graphs["q4"], precision="q4")["quantization"]
    assert record["recipe"] == "q4"
    assert record["applied"] == {"gather8": 1, "nbits8-b32-acc4 (embedding's bytes)": 1, "q4_exact": 7 * K}
    assert record["grid_error_steps"] == {"gather8": 0.0, "q4_exact": 0.0}
    assert record["lossless_states"] is True
    fp32_states, fp32_logits = run_schedule(grid_graphs["fp32"], IDS)
    q4_states, q4_logits = run_schedule(grid_graphs["q4"], IDS)
    assert np.abs(q4_states - fp32_states).max() < 1e-5 * np.abs(fp32_states).max()
    # The exit head multiplies with int8 activations: close, not equal.
    assert np.abs(q4_logits - fp32_logits).max() < 0.05 * np.abs(fp32_logits).max()
    q4_size = (grid_graphs["q4"] / GRAPH_FILE).stat().st_size
    assert q4_size < 0.6 * (grid_graphs["fp32"] / GRAPH_FILE).stat().st_size


def test_q4_keeps_weights_off_the_grid_in_fp32(random_graphs) -> None:
    record = check_manifest(random_graphs["q4"], precision="q4")["quantization"]
    assert record["applied"] == {"fp32": 7 * K + 1, "nbits8-b32-acc4": 1}  # layers + embedding stay; the head is int8
    assert record["grid_error_steps"]["q4_exact"] > 0.1 and record["lossless_states"] is True
    fp32_states, _ = run_schedule(random_graphs["fp32"], IDS)
    q4_states, _ = run_schedule(random_graphs["q4"], IDS)
    np.testing.assert_allclose(q4_states, fp32_states, atol=1e-6)


def test_int8_graph_states_are_close_but_lossy(grid_graphs) -> None:
    record = check_manifest(grid_graphs["int8"], precision="int8")["quantization"]
    assert record["applied"] == {"gather8": 1, "nbits8-b32-acc4": 7 * K, "nbits8-b32-acc4 (embedding's bytes)": 1}
    assert record["lossless_states"] is False
    fp32_states, _ = run_schedule(grid_graphs["fp32"], IDS)
    int8_states, _ = run_schedule(grid_graphs["int8"], IDS)
    rel = np.linalg.norm(int8_states - fp32_states) / np.linalg.norm(fp32_states)
    assert 0 < rel < 0.05


def test_block4_restores_grid_weights_and_bounds_others() -> None:
    rng = np.random.default_rng(1)
    step = rng.uniform(0.01, 0.1, (1, 3, 1, 5))
    lo = rng.normal(0, 0.2, (1, 3, 1, 5))
    levels = rng.integers(0, 16, (1, 3, GRID_BLOCK, 5))
    levels[:, :, 0], levels[:, :, -1] = 0, 15  # every block reaches both ends of its grid, as a GGUF block does
    on_grid = (lo + step * levels).reshape(3 * GRID_BLOCK, 5)
    for weight, worst in ((on_grid, 1e-5), (rng.normal(0, 1, (64, 7)), 0.5 + 1e-6)):  # in steps; fp32 input rounding
        b = block4(weight.astype(np.float32))
        k, n = weight.shape
        q = np.stack([b.packed & 15, b.packed >> 4], -1).reshape(n, k // GRID_BLOCK, GRID_BLOCK).astype(np.float64)
        zp_bytes = b.zero_points.reshape(n, -1)
        zp = np.stack([zp_bytes & 15, zp_bytes >> 4], -1).reshape(n, -1)[:, : k // GRID_BLOCK, None]
        scale = b.scales.reshape(n, -1, 1)
        restored = ((q - zp) * scale + b.offsets.T[..., None]).transpose(1, 2, 0).reshape(k, n)
        assert np.abs(restored - weight).max() <= worst * scale.max() + 1e-6
        assert b.grid_error <= worst


def test_block8_rows_is_exact_on_a_q8_table() -> None:
    rng = np.random.default_rng(2)
    scale = rng.uniform(0.001, 0.01, (4, 2, 1))
    table = (rng.integers(-127, 128, (4, 2, GRID_BLOCK)) * scale).reshape(4, 2 * GRID_BLOCK)
    table[:, 0] = 127 * scale[:, 0, 0]
    table[:, GRID_BLOCK] = -127 * scale[:, 1, 0]
    data, scales, err = block8_rows(table)
    assert err < 1e-9
    np.testing.assert_allclose((data.reshape(4, 2, GRID_BLOCK).astype(np.float64) - 128) * scales[..., None], table.reshape(4, 2, -1), rtol=1e-6)


def test_roles_come_from_module_paths(grid_graphs) -> None:
    graph = onnx.load(str(grid_graphs["fp32"] / GRAPH_FILE))
    paths = sorted(path for _, path in weight_nodes(graph))
    want = sorted([f"edge.layers.{i}.{m}" for i in range(K) for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                   "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")] + ["edge.head.lm_head", "edge.embed_tokens"])
    assert paths == want
    q4 = onnx.load(str(grid_graphs["q4"] / GRAPH_FILE))
    assert {module_path(n) for n in q4.graph.node if n.op_type == "MatMulNBits"} >= {"edge.layers.0.mlp.down_proj", "edge.head.lm_head"}


def test_a_recipe_applies_by_role(grid_graphs, tmp_path) -> None:
    keep_down = Recipe("keep-down", (("*.down_proj", Scheme("fp32")), ("edge.layers.*", nbits(4, 32, 4, symmetric=False))))
    out = quantize_edge_dir(grid_graphs["fp32"], tmp_path / "keep-down", keep_down)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["precision"] == "keep-down"
    assert manifest["quantization"]["applied"] == {"fp32": K + 2, "nbits4-b32-acc4": 6 * K}  # + embedding + head
    assert manifest["files"][GRAPH_FILE] == (out / GRAPH_FILE).stat().st_size
    states, _ = run_schedule(out, IDS)
    assert states.shape == (len(IDS), 64)


def test_bad_schemes_and_sources_are_refused(grid_graphs, tmp_path) -> None:
    with pytest.raises(QuantizationError, match="kind 'int3'"):
        Scheme("int3")
    with pytest.raises(QuantizationError, match="bits=3"):
        nbits(3)
    with pytest.raises(QuantizationError, match="block_size=48"):
        nbits(8, 48)
    with pytest.raises(QuantizationError, match="unknown quantization recipe 'int2'"):
        quantize_edge_dir(grid_graphs["fp32"], tmp_path / "x", "int2")
    with pytest.raises(QuantizationError, match="holds a 'q4' graph"):
        quantize_edge_dir(grid_graphs["q4"], tmp_path / "y", "int8")
    embed_as_q4 = Recipe("bad", (("edge.embed_tokens", Scheme("q4_exact")),))
    with pytest.raises(QuantizationError, match="edge.embed_tokens is an embedding Gather"):
        quantize_edge_dir(grid_graphs["fp32"], tmp_path / "z", embed_as_q4)


def test_fidelity_measure_sees_damaged_states(grid_graphs) -> None:
    """The teacher-forced measure on a tiny model: the fp32 graph agrees fully, a graph with noisy states does not."""
    from offramp.models.corpus import TextSequence
    from offramp.models.edge_fidelity import measure, reference

    model = snap_to_gguf_grids(make_tiny_llama(seed=7))
    rng = np.random.default_rng(3)
    seqs = [TextSequence(f"t{i}", "chat" if i else "stdlib", "test", rng.integers(0, 128, 40).tolist(), 10 if i else 1) for i in range(3)]
    ref = reference(model, K, seqs)
    exact = measure(OnnxEdgeRuntime(grid_graphs["q4"]), model, seqs, ref)
    assert exact.agreement == 1.0 and exact.positions == 39 + 2 * 30 and exact.hidden_rel_error < 1e-5

    class Noisy:
        exit_layer = K

        def __init__(self, runtime: OnnxEdgeRuntime) -> None:
            self.runtime = runtime

        def reset(self) -> None:
            self.runtime.reset()

        def run(self, ids: list[int]):
            step = self.runtime.run(ids)
            step.hidden = step.hidden + rng.normal(0, 2 * np.abs(step.hidden).mean(), step.hidden.shape).astype(np.float32)
            return step

    damaged = measure(Noisy(OnnxEdgeRuntime(grid_graphs["fp32"])), model, seqs, ref)
    assert damaged.agreement < 0.9 and damaged.hidden_rel_error > 0.5


# --- the real default model -------------------------------------------------------------------------------------

FIXED_TEXT = (
    "Large language models are usually served from data centres, but many tokens in a reply are easy to predict. "
    "An edge device can run the first few layers of the network and stop early when its exit head is confident, "
    "sending only the hard tokens to the cloud. The cloud keeps the key-value cache of the deep layers for every "
    "conversation, so an escalated token costs one step of the remaining layers rather than a full forward pass."
)


@pytest.mark.slow
def test_q4_keeps_the_clouds_tokens_on_the_default_model(tmp_path_factory, default_model) -> None:
    """Teacher-forced on a fixed paragraph and the model's own greedy reply to a chat prompt, K=15: >= 99%."""
    from offramp.models.corpus import TextSequence, encode_prompt
    from offramp.models.edge_fidelity import measure, reference

    model, tok = default_model
    prompt = encode_prompt(tok, "chat", "Why is the water cycle important?")
    with torch.no_grad():
        reply = model.generate(torch.tensor([prompt]), max_new_tokens=48, do_sample=False)[0, len(prompt):].tolist()
    seqs = [TextSequence("fixed", "stdlib", "test", tok(FIXED_TEXT)["input_ids"], 1),
            TextSequence("chat", "chat", "test", prompt + reply, len(prompt))]
    graph = export_edge(model, 15, tmp_path_factory.mktemp("default-q4") / "q4", "q4", progress=False)
    record = check_manifest(graph, precision="q4")["quantization"]
    assert record["lossless_states"] is True and record["applied"]["q4_exact"] == 7 * 15
    fid = measure(OnnxEdgeRuntime(graph, intra_op_threads=1), model, seqs, reference(model, 15, seqs))
    print(f"\nq4 K=15: teacher-forced agreement {fid.agreement:.4f} over {fid.positions} positions, "
          f"exit top-1 vs fp32 {fid.exit_top1:.3f}, median state rel err {fid.hidden_rel_error:.2e}")
    assert fid.positions > 100
    assert fid.agreement >= 0.99
