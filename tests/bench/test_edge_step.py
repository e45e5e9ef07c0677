"""`offramp bench edge-step` on a tiny checkpoint: every precision and candidate timed, fidelity columns filled."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from offramp.bench import edge_step
from tests.conftest import save_tiny_checkpoint


def test_bench_edge_step_rows_and_fidelity(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFRAMP_HOME", str(tmp_path / "home"))
    model_dir = save_tiny_checkpoint(tmp_path / "tiny", num_layers=4)  # its word tokenizer has no pad/EOS: human text only
    out = tmp_path / "bench.json"
    assert edge_step.main(["--model", str(model_dir), "--exit-layers", "2", "--steps", "4", "--rounds", "2", "--candidates",
                           "--accuracy", "--accuracy-prompts", "0", "--human-tokens", "64", "--llama-cpp", "off",
                           "--out", str(tmp_path / "graphs"), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    rows = {r["runtime"]: r for r in result["rows"]}
    from offramp.models.quantize import CANDIDATES

    assert set(rows) == {"ort-fp32", "torch-fp32", *(f"ort-{c}" for c in CANDIDATES)}
    assert len({tuple(r) for r in result["rows"]}) == 1  # uniform keys: the report prints the first row's as header
    assert rows["ort-fp32"]["x_fp32"] == 1.0 and rows["ort-fp32"]["agreement"] == 1.0
    assert rows["ort-q4"]["agreement"] == 1.0 and rows["ort-q4"]["hidden_rel_err"] < 1e-5  # off-grid: layers stay fp32
    assert all(0 <= r["agreement"] <= 1 and r["positions"] > 0 and r["median_ms"] > 0 for r in rows.values())
    assert rows["ort-q4"]["recipe"] == "q4" and rows["torch-fp32"]["recipe"] == "torch"
