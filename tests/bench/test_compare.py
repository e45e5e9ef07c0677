"""The bench's pieces on a tiny random model: modes, decode loops, agreement, aggregation, the summary rule, the
report, and one pass through a real `offramp cloud serve` behind the link emulator.

The full bench (the default model, every profile) is not a unit test; this checks that its parts fit, that what it
measures holds where it must (lossless is exact, drafting does not change the output), and that the summary
picks what the issue asks for.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest

from offramp.bench import compare as bench
from offramp.bench import modes as bm
from offramp.bench import report as bench_report
from offramp.shared.cli import main as cli_main
from tests.conftest import save_tiny_checkpoint

ASYNC = pytest.mark.asyncio(loop_scope="session")


@pytest.fixture(scope="module")
def tiny_checkpoints(tmp_path_factory):
    """Tiny checkpoints (weights + word-level tokenizer) the bench exports edge directories from, in a cache of their own."""
    import os

    root = tmp_path_factory.mktemp("bench-tiny")
    old = os.environ.get("OFFRAMP_HOME")
    os.environ["OFFRAMP_HOME"] = str(root / "home")
    try:
        yield {name: save_tiny_checkpoint(root / name, num_layers=4, seed=0, **extra)
               for name, extra in (("plain", {}), ("wide", {"initializer_range": 0.3}))}
    finally:
        if old is None:
            os.environ.pop("OFFRAMP_HOME", None)
        else:
            os.environ["OFFRAMP_HOME"] = old


def tiny_bench_edge(checkpoint: Path, cfg: "bench.BenchConfig") -> "bench.Edge":
    from offramp.models import load_model

    model, tokenizer = load_model(str(checkpoint))
    return bench.Edge(bench.BenchConfig(**{**asdict(cfg), "model": str(checkpoint)}), model=model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def tiny_edge(tiny_checkpoints):
    cfg = bench.BenchConfig(model="tiny", exit_layers=[2], edge_precisions=["fp32"], cloud="inprocess",
                            prompts=2, max_new_tokens=6, thresholds=[0.0, 2.0], codecs=["int8", "fp32"],
                            edge_step_bench=False, heads="none")
    edge = tiny_bench_edge(tiny_checkpoints["plain"], cfg)
    return edge, edge.cfg


def _prompts() -> list[bm.BenchPrompt]:
    return [bm.BenchPrompt("a", "plain", "", (1, 5, 9, 3)), bm.BenchPrompt("b", "chat", "", (7, 2, 4))]


def _setting(threshold: float, codec: str = "fp32", loop: str = "plain", k: int = 2) -> bm.Setting:
    return bm.Setting.with_loop(loop, k, threshold, codec, "fp32", draft_ahead=3, max_draft=3)


@ASYNC
async def test_modes_in_process_agree_where_they_must(tiny_edge) -> None:
    edge, cfg = tiny_edge
    backend = bench.InProcessBackend(edge)
    prompts = _prompts()
    cloud = await bench.run_mode(backend, edge, cfg, prompts, "inprocess", "cloud-only")
    always_cloud = await bench.run_mode(backend, edge, cfg, prompts, "inprocess", "collaborative", _setting(2.0))
    always_edge = await bench.run_mode(backend, edge, cfg, prompts, "inprocess", "collaborative", _setting(0.0, "int8"))
    edge_only = await bench.run_mode(backend, edge, cfg, prompts, "none", "edge-only", _setting(0.0, "none"))
    # The full model judged against itself, and every token escalated over a lossless codec: 100%.
    assert cloud.agreement == 1.0 and cloud.exact_match == 1.0 and cloud.tokens == 12
    assert always_cloud.agreement == 1.0 and always_cloud.exit_rate == 0.0
    payload = always_cloud.positions_uploaded * 64 * 4  # fp32: 4 bytes x hidden 64, plus each frame's msgpack framing
    assert payload < always_cloud.payload_up < payload + 200 * (always_cloud.round_trips + 4)
    # Threshold 0 exits every token: no cloud work, same tokens as edge-only.
    assert always_edge.exit_rate == 1.0 and always_edge.cloud_layer_tokens == 0
    assert always_edge.agreement == edge_only.agreement
    rows = [cloud, always_cloud, always_edge]
    bm.compare_to_baseline(rows)
    assert cloud.latency_ratio == 1.0 and cloud.cloud_compute_ratio == 1.0
    assert always_cloud.cloud_compute_ratio == pytest.approx(0.5, abs=0.1)  # 2 of 4 layers, catch-up of every position
    assert always_cloud.loop == "plain" and always_cloud.key == "K2/t2/fp32/fp32/plain" and edge_only.key == "edge-only K2/fp32"


def _tokens(row: bm.ModeRow) -> list:
    return [r["tokens"] for r in row.per_request]


@ASYNC
async def test_decode_loops_measured_side_by_side(tiny_edge, tiny_checkpoints) -> None:
    """Drafting and eager catch-up leave the plain loop's output as it is; lossless is the full model's output."""
    _, cfg = tiny_edge
    cfg = bench.BenchConfig(**{**asdict(cfg), "max_new_tokens": 12})
    # Larger random weights: the layers after K change the argmax, so edge tokens can be wrong and drafts rejected.
    edge = tiny_bench_edge(tiny_checkpoints["wide"], cfg)
    backend = bench.InProcessBackend(edge)
    prompts = _prompts()
    rows = {loop: await bench.run_mode(backend, edge, cfg, prompts, "inprocess", "collaborative", _setting(0.2, loop=loop))
            for loop in bm.LOOPS}
    plain = rows["plain"]
    assert 0.0 < plain.exit_rate < 1.0 and plain.agreement < 0.9
    for loop in ("draft", "eager", "eager+draft"):
        assert rows[loop].agreement == plain.agreement and rows[loop].exit_rate == plain.exit_rate, loop
        assert rows[loop].draft_ahead == (3 if "draft" in loop else 0)
        assert rows[loop].catch_up == ("eager" if "eager" in loop else "lazy")
    lossless = rows["lossless"]
    assert lossless.agreement == 1.0 and lossless.exact_match == 1.0 and lossless.lossless and lossless.max_draft == 3
    assert lossless.exit_rate == 0.0 and lossless.rejected_drafts > 0  # every token confirmed by the cloud; some drafts rejected
    assert plain.whatif is not None and rows["draft"].whatif is None  # the what-if model replays the plain loop only
    summary = bm.summary_of(lossless, 64)
    assert summary["loop"] == "lossless3" and summary["lossless"] is True and summary["catch_up"] == "lazy"


def _row(key: tuple, agreement: float, latency: float, layer_tokens: int, loop: str = "plain") -> bm.ModeRow:
    row = bm.ModeRow.of("collaborative", "wan", bm.Setting.with_loop(loop, *key, "fp32"))
    row.requests, row.tokens, row.agreement, row.latency_p50_s = 1, 10, agreement, latency
    row.cloud_layer_tokens, row.wire_up, row.positions_uploaded = layer_tokens, 5800, 10
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
    # Every loop competes; the summary says which one won, with its options.
    lossless = _row((26, 0.5, "int8o"), 1.0, 1.0, 60, loop="lossless")
    lossless.tokens = 5  # stopped early: cloud work is compared per generated token
    bm.compare_to_baseline(rows + [lossless])
    summary = bm.summary_of(bm.best_setting(rows + [lossless], "wan"), 576)
    assert summary["loop"] == "lossless8" and summary["lossless"] is True and summary["draft_ahead"] == 0
    assert summary["cloud_compute_ratio"] == pytest.approx(0.12)


def test_settings_sweep_thresholds_at_k0_and_the_rest_at_its_calibrated_threshold() -> None:
    cfg = bench.BenchConfig(exit_layers=[26, 15], thresholds=[0.95, 2.0], codecs=["int8o", "fp16", "fp32"],
                            edge_precisions=["fp32", "int8"], loops=["draft", "eager", "lossless"], lossless_thresholds=[0.5],
                            draft_ahead=4, max_draft=8)
    keys = [s.key for s in cfg.collaborative_settings({26: 0.8712})]
    assert keys == [
        "K26/t0.8712/int8o/fp32/plain", "K26/t0.95/int8o/fp32/plain", "K26/t2/int8o/fp32/plain",
        "K15/t0.9/int8o/fp32/plain",  # the other Ks: their calibrated threshold, here none, so the default
        "K26/t0.8712/int8o/fp32/draft4", "K26/t0.8712/int8o/fp32/eager", "K26/t0.8712/int8o/fp32/lossless8",
        "K26/t0.5/int8o/fp32/lossless8",
        "K26/t0.8712/fp16/fp32/plain", "K26/t0.8712/fp32/fp32/plain", "K26/t0.8712/int8o/int8/plain",
    ]
    # Without calibration or thresholds: the uncalibrated default, 0.9.
    bare = bench.BenchConfig(exit_layers=[15], thresholds=[], codecs=["int8o"], edge_precisions=["fp32"], loops=[], lossless_thresholds=[])
    assert [s.key for s in bare.collaborative_settings()] == ["K15/t0.9/int8o/fp32/plain"]


def test_followup_profiles_rerun_the_fastest_faithful_setting_of_each_loop() -> None:
    rows = [_row((15, 0.5, "int8o"), 0.90, 0.8, 200), _row((20, 0.8, "int8o"), 0.985, 1.2, 150),
            _row((20, 0.95, "int8o"), 0.999, 1.0, 300), _row((25, 0.9, "int8o"), 0.95, 0.9, 100),
            _row((20, 0.5, "int8o"), 1.0, 1.1, 300, loop="lossless"), _row((20, 0.6, "int8o"), 1.0, 1.3, 300, loop="lossless")]
    assert [s.key for s in bm.followup_settings(rows, 4)] == [
        "K20/t0.95/int8o/fp32/plain", "K20/t0.5/int8o/fp32/lossless8", "K20/t0.8/int8o/fp32/plain", "K20/t0.6/int8o/fp32/lossless8"]
    assert [s.key for s in bm.followup_settings(rows, 6)][-2:] == ["K25/t0.9/int8o/fp32/plain", "K15/t0.5/int8o/fp32/plain"]


def test_quick_is_small_and_has_a_lossless_setting() -> None:
    quick = bench.config_from_args(bench.build_parser().parse_args(["--quick"]))
    settings = quick.collaborative_settings({26: 0.85})
    assert quick.quick and quick.prompts <= 4 and quick.profiles == ["wan"] and len(settings) <= 4
    assert any(s.lossless for s in settings) and any(s.draft_ahead for s in settings)


@ASYNC
async def test_report_from_results(tiny_edge, tmp_path: Path) -> None:
    edge, cfg = tiny_edge
    backend = bench.InProcessBackend(edge)
    rows = [await bench.run_mode(backend, edge, cfg, _prompts(), "inprocess", "cloud-only"),
            await bench.run_mode(backend, edge, cfg, _prompts(), "inprocess", "collaborative", _setting(2.0))]
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
    assert "| inprocess | 2 | 2 | fp32 | fp32 | plain | 100.0% |" in report
    assert (tmp_path / "pareto.png").stat().st_size > 1000 and (tmp_path / "scaling.png").exists()


def test_whatif_model_overlaps_agreeing_escalations_only() -> None:
    tl = {"sources": ["edge", "cloud", "edge", "edge", "cloud", "edge"], "draft_agrees": [1, 1, 1, 1, 0, 1],
          "prefill_s": 0.1, "step_s": [0.01] * 5, "rtt_s": [0.05, 0.05]}
    assert bm.simulate_timeline(tl, speculative=False) == pytest.approx(0.1 + 5 * 0.01 + 2 * 0.05)
    # The first escalation's draft was right: its round trip overlaps the next steps; the second blocks.
    assert bm.simulate_timeline(tl, speculative=True) == pytest.approx(0.1 + 0.03 + 0.05 + 0.01 + 0.01)


def test_bench_end_to_end_against_a_real_cloud_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`offramp bench compare` (what `scripts/bench` runs) on a tiny checkpoint: `offramp cloud serve` and the link emulator as processes,
    cloud-only over HTTP, collaborative over the WebSocket link, every loop, clients, results.json and the report."""
    monkeypatch.setenv("OFFRAMP_HOME", str(tmp_path / "home"))  # nothing lands in the real artifact cache
    model_dir = save_tiny_checkpoint(tmp_path / "tiny", num_layers=4)
    out = tmp_path / "results"
    assert cli_main(["bench", "compare", "--model", str(model_dir), "--profiles", "lan", "--exit-layers", "2", "--edge-precisions", "fp32",
                       "--heads", "none", "--prompts", "2", "--max-new-tokens", "6", "--thresholds", "0.02,2",
                       "--codecs", "fp32", "--codec-threshold", "0.02", "--loops", "draft,lossless", "--draft-ahead", "2", "--max-draft", "3",
                       "--clients", "1,2", "--no-edge-step", "--out", str(out)]) == 0
    run = next(out.iterdir())
    results = json.loads((run / "results.json").read_text())
    assert results["meta"]["cloud"] == "offramp cloud serve"
    assert results["meta"]["command"].startswith("offramp bench compare --model ")
    rows = {r["key"]: r for r in results["lan"]["rows"]}
    cloud = rows["cloud-only"]
    assert cloud["errors"] == 0 and cloud["agreement"] == 1.0 and cloud["tokens"] == 12  # the server's full model
    assert cloud["cloud_cpu_s"] > 0 and cloud["wire_up"] > 0 and cloud["wire_down"] > 0  # measured, not modeled
    never_exit = rows["K2/t2/fp32/fp32/plain"]
    assert never_exit["agreement"] == 1.0 and never_exit["exit_rate"] == 0.0
    assert never_exit["cloud_compute_ratio"] == pytest.approx(0.5)  # 2 of 4 layers for every position, prompt included
    assert rows["K2/t0.02/fp32/fp32/lossless3"]["agreement"] == 1.0
    assert {"K2/t0.02/fp32/fp32/plain", "K2/t0.02/fp32/fp32/draft2", "edge-only K2/int8"} <= set(rows)
    assert all(r["errors"] == 0 for r in rows.values())
    assert results["lan"]["summary"]["exit_layer"] == 2 and "loop" in results["lan"]["summary"]
    assert [(c["clients"], c["mode"], c["errors"]) for c in results["clients"]] == [
        (1, "cloud-only", 0), (1, "collaborative", 0), (2, "cloud-only", 0), (2, "collaborative", 0)]
    assert "| lan |" in (run / "report.md").read_text()
