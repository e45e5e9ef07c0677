"""`offramp bench exit-step` on a tiny checkpoint: one row per forced early-exit rate beside the one-exit edge."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from offramp.bench import exit_step
from tests.conftest import save_tiny_checkpoint


def test_bench_exit_step_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFRAMP_HOME", str(tmp_path / "home"))
    model_dir = save_tiny_checkpoint(tmp_path / "tiny", num_layers=4)
    out = tmp_path / "bench.json"
    assert exit_step.main(["--model", str(model_dir), "--exit-layers", "1", "3", "--precision", "fp32", "--rates", "0", "1",
                           "--context", "8", "--tokens", "4", "--rounds", "2", "--json", str(out)]) == 0
    rows = {r["edge"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"exits 3", "exits 1/3 @ 0.00", "exits 1/3 @ 1.00"}
    assert rows["exits 3"]["saved_ms"] == 0 and all(r["ms_per_token"] > 0 and len(r["rounds_ms"]) == 2 for r in rows.values())


def test_bench_exit_step_needs_an_early_exit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFRAMP_HOME", str(tmp_path / "home"))
    model_dir = save_tiny_checkpoint(tmp_path / "tiny", num_layers=4)
    with pytest.raises(SystemExit):
        exit_step.main(["--model", str(model_dir), "--exit-layers", "3"])
