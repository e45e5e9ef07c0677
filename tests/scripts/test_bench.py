"""The bench's pieces on a tiny random model: modes, agreement, aggregation, the summary rule, the report.

The full bench (real servers, emulated links) is not a unit test; this checks that its parts fit and that the
summary picks what the issue asks for.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from tests.conftest import make_tiny_llama

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))

import bench  # noqa: E402
import bench_modes as bm  # noqa: E402
import bench_report  # noqa: E402

ASYNC = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def tiny_edge():
    cfg = bench.BenchConfig(model="tiny", exit_layers=[2], edge_precisions=["torch"], cloud="inprocess",
                            prompts=2, max_new_tokens=6, thresholds=[0.0, 2.0], codecs=["int8", "fp32"],
                            edge_step_bench=False, heads="none")
    return bench.Edge(cfg, model=make_tiny_llama(num_layers=4), tokenizer=object()), cfg


def _prompts() -> list[bm.BenchPrompt]:
    return [bm.BenchPrompt("a", "plain", "", (1, 5, 9, 3)), bm.BenchPrompt("b", "chat", "", (7, 2, 4))]


@ASYNC
async def test_modes_in_process_agree_where_they_must(tiny_edge) -> None:
    edge, cfg = tiny_edge
    backend = bench.InProcessBackend(edge)
    prompts = _prompts()
    cloud = await bench.run_mode(backend, edge, cfg, prompts, "inprocess", "cloud-only")
    always_cloud = await bench.run_mode(backend, edge, cfg, prompts, "inprocess", "collaborative", 2, 2.0, "fp32")
    always_edge = await bench.run_mode(backend, edge, cfg, prompts, "inprocess", "collaborative", 2, 0.0, "int8")
    edge_only = await bench.run_mode(backend, edge, cfg, prompts, "none", "edge-only", 2)
    # The full model judged against itself, and every token escalated over a lossless codec: 100%.
    assert cloud.agreement == 1.0 and cloud.exact_match == 1.0 and cloud.tokens == 12
    assert always_cloud.agreement == 1.0 and always_cloud.exit_rate == 0.0
    assert always_cloud.payload_up == always_cloud.positions_uploaded * 64 * 4  # fp32: 4 bytes x hidden 64
    # Threshold 0 exits every token: no cloud work, same tokens as edge-only.
    assert always_edge.exit_rate == 1.0 and always_edge.cloud_layer_tokens == 0
    assert always_edge.agreement == edge_only.agreement
    rows = [cloud, always_cloud, always_edge]
    bm.compare_to_baseline(rows)
    assert cloud.latency_ratio == 1.0 and cloud.cloud_compute_ratio == 1.0
    assert always_cloud.cloud_compute_ratio == pytest.approx(0.5, abs=0.1)  # 2 of 4 layers, catch-up of every position


def _row(key: tuple, agreement: float, latency: float, layer_tokens: int, profile: str = "wan") -> bm.ModeRow:
    k, t, c = key
    row = bm.ModeRow("collaborative", profile, k, t, c, "int8", requests=1, tokens=10, agreement=agreement,
                     latency_p50_s=latency, cloud_layer_tokens=layer_tokens, wire_up=5800, positions_uploaded=10)
    return row


def test_summary_is_the_fastest_setting_at_98_percent_agreement() -> None:
    base = bm.ModeRow("cloud-only", "wan", requests=1, tokens=10, agreement=1.0, latency_p50_s=2.0, cloud_layer_tokens=1000)
    fast_wrong = _row((15, 0.5, "int8"), 0.90, 0.8, 200)
    good = _row((20, 0.8, "int8"), 0.985, 1.2, 150)
    slow_good = _row((20, 0.95, "fp16"), 0.999, 1.6, 300)
    rows = [base, fast_wrong, good, slow_good]
    bm.compare_to_baseline(rows)
    best = bm.best_setting(rows, "wan")
    assert best is good
    summary = bm.summary_of(best, hidden_size=576)
    assert summary["latency_ratio"] == pytest.approx(0.6)
    assert summary["cloud_compute_ratio"] == pytest.approx(0.15)
    assert summary["bytes_up_per_position"] == pytest.approx(580)
    assert set(summary) >= {"threshold", "exit_layer", "codec", "agreement", "latency_ratio", "cloud_compute_ratio", "bytes_up_per_token"}
    assert bm.summary_of(bm.best_setting([base, fast_wrong], "wan"), 576)["exit_layer"] is None


def test_settings_sweep_thresholds_per_k_and_codecs_at_one_point() -> None:
    cfg = bench.BenchConfig(exit_layers=[15, 20], thresholds=[0.5, 0.8, 0.9], codecs=["int8", "fp16", "fp32"],
                            edge_precisions=["int8", "fp32"])
    settings = cfg.collaborative_settings({20: 0.87})
    assert (15, 0.8, "fp16", "int8") in settings and (15, 0.8, "fp32", "int8") in settings
    assert (20, 0.87, "int8", "int8") in settings and (15, 0.5, "int8", "fp32") in settings
    assert len(settings) == len(set(settings)) == 3 + 4 + 2 + 3


def test_followup_profiles_rerun_the_fastest_faithful_settings() -> None:
    rows = [_row((15, 0.5, "int8"), 0.90, 0.8, 200), _row((20, 0.8, "int8"), 0.985, 1.2, 150),
            _row((20, 0.95, "int8"), 0.999, 1.0, 300), _row((25, 0.9, "int8"), 0.95, 0.9, 100)]
    assert bm.followup_settings(rows, 3) == [(20, 0.95, "int8", "int8"), (20, 0.8, "int8", "int8"), (25, 0.9, "int8", "int8")]


def test_quick_is_small() -> None:
    quick = bench.config_from_args(bench.build_parser().parse_args(["--quick"]))
    assert quick.quick and quick.prompts <= 4 and len(quick.collaborative_settings()) <= 3


@ASYNC
async def test_report_from_results(tiny_edge, tmp_path: Path) -> None:
    edge, cfg = tiny_edge
    backend = bench.InProcessBackend(edge)
    rows = [await bench.run_mode(backend, edge, cfg, _prompts(), "inprocess", "cloud-only"),
            await bench.run_mode(backend, edge, cfg, _prompts(), "inprocess", "collaborative", 2, 2.0, "fp32")]
    bm.compare_to_baseline(rows)
    results = {
        "meta": {"created": "now", "command": "scripts/bench", "git": "x", "elapsed_s": 1.0, "config": {"max_new_tokens": 6, "clients_profile": "inprocess"},
                 "model": "tiny", "num_layers": 4, "hidden_size": 64, "prompts": [{}, {}], "prompt_origin": "test",
                 "edge_precision": {}, "exit_rule": {}, "cloud": "inprocess", "cpu_count": 2, "loadavg_start": [0.0], "loadavg_end": [0.0],
                 "agreement_definition": "teacher-forced"},
        "clients": [{"mode": "cloud-only", "clients": 1, "requests": 1, "throughput_tok_s": 5.0, "latency_p50_s": 1.0,
                     "latency_p99_s": 1.0, "cloud_cpu_s": None, "errors": 0}],
        "edge_step": {},
        "inprocess": {"summary": bm.summary_of(bm.best_setting(rows, "inprocess"), 64), "rows": [r.to_dict() for r in rows]},
    }
    json.dumps(results)  # serialisable as written
    bench_report.write_report(results, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| inprocess | 2 | 2 | fp32 | torch | 100.0% |" in report
    assert (tmp_path / "pareto.png").stat().st_size > 1000 and (tmp_path / "scaling.png").exists()


def test_whatif_model_overlaps_agreeing_escalations_only() -> None:
    tl = {"sources": ["edge", "cloud", "edge", "edge", "cloud", "edge"], "draft_agrees": [1, 1, 1, 1, 0, 1],
          "prefill_s": 0.1, "step_s": [0.01] * 5, "rtt_s": [0.05, 0.05]}
    assert bm.simulate_timeline(tl, speculative=False) == pytest.approx(0.1 + 5 * 0.01 + 2 * 0.05)
    # The first escalation's draft was right: its round trip overlaps the next steps; the second blocks.
    assert bm.simulate_timeline(tl, speculative=True) == pytest.approx(0.1 + 0.03 + 0.05 + 0.01 + 0.01)
