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


def _setting(threshold: float, codec: str = "fp32", loop: str = "exit", k: int = 2) -> bm.Setting:
    return bm.Setting.with_loop(loop, k, threshold, codec, "fp32", max_draft=3)


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
    assert always_cloud.loop == "exit" and always_cloud.key == "K2/t2/fp32/fp32/exit" and edge_only.key == "edge-only K2/fp32"
    assert always_cloud.round_trips > 0 and always_cloud.tokens_per_round_trip == always_cloud.tokens / always_cloud.round_trips


def _tokens(row: bm.ModeRow) -> list:
    return [r["tokens"] for r in row.per_request]


@ASYNC
async def test_decode_loops_measured_side_by_side(tiny_edge, tiny_checkpoints) -> None:
    """Eager catch-up leaves exit mode's output as it is; lossless is the full model's output."""
    _, cfg = tiny_edge
    cfg = bench.BenchConfig(**{**asdict(cfg), "max_new_tokens": 12})
    # Larger random weights: the layers after K change the argmax, so edge tokens can be wrong and drafts rejected.
    edge = tiny_bench_edge(tiny_checkpoints["wide"], cfg)
    backend = bench.InProcessBackend(edge)
    prompts = _prompts()
    rows = {loop: await bench.run_mode(backend, edge, cfg, prompts, "inprocess", "collaborative", _setting(0.2, loop=loop))
            for loop in bm.LOOPS}
    exit_mode = rows["exit"]
    assert 0.0 < exit_mode.exit_rate < 1.0 and exit_mode.agreement < 0.9
    eager = rows["exit-eager"]
    assert eager.agreement == exit_mode.agreement and eager.exit_rate == exit_mode.exit_rate and eager.catch_up == "eager"
    lossless = rows["lossless"]
    assert lossless.agreement == 1.0 and lossless.exact_match == 1.0 and lossless.lossless and lossless.max_draft == 3
    assert lossless.exit_rate == 0.0 and lossless.rejected_drafts > 0  # every token confirmed by the cloud; some drafts rejected
    checked = lossless.accepted_drafts + lossless.rejected_drafts  # drafts after a rejected one are never checked
    assert 0.0 <= lossless.acceptance_rate < 1.0 and lossless.acceptance_rate == lossless.accepted_drafts / checked
    assert checked <= lossless.drafted_tokens
    summary = bm.summary_of(lossless, 64)
    assert summary["loop"] == "lossless3" and summary["lossless"] is True and summary["catch_up"] == "lazy"
    headline = bm.headline_of(lossless)
    assert set(bm.HEADLINE_KEYS) <= set(headline) and headline["tokens_per_round_trip"] == lossless.tokens / lossless.round_trips


def _row(key: tuple, agreement: float, latency: float, layer_tokens: int, loop: str = "exit") -> bm.ModeRow:
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
    assert summary["loop"] == "lossless16" and summary["lossless"] is True and summary["fixed_draft"] == 0
    assert summary["cloud_compute_ratio"] == pytest.approx(0.12)


def test_headline_is_the_default_mode_at_each_k_and_the_grid_compares_at_k0() -> None:
    cfg = bench.BenchConfig(exit_layers=[15, 10], thresholds=[0.95, 2.0], codecs=["int8o", "fp16", "fp32"],
                            edge_precisions=["q4", "fp32"], loops=["exit-eager"], fixed_drafts=[4, 8], max_draft=8)
    calibrated = {15: 0.8712}
    assert [s.key for s in cfg.headline_settings(calibrated)] == [
        "K15/t0.8712/int8o/q4/lossless8", "K10/t0.9/int8o/q4/lossless8",  # lossless, every default, at each K
        "K15/t0.8712/int8o/q4/exit",  # --no-lossless at K0's calibrated threshold
    ]
    assert [s.key for s in cfg.grid_settings(calibrated)] == [
        "K15/t0.95/int8o/q4/exit", "K15/t2/int8o/q4/exit",
        "K10/t0.9/int8o/q4/exit",  # the other Ks: their calibrated threshold, here none, so the default
        "K15/t0.8712/int8o/q4/exit-eager",
        "K15/t0.8712/fp16/q4/lossless8", "K15/t0.8712/fp32/q4/lossless8", "K15/t0.8712/int8o/fp32/lossless8",
        "K15/t0.8712/int8o/q4/lossless-fixed4", "K15/t0.8712/int8o/q4/lossless-fixed8",
    ]
    bare = bench.BenchConfig(exit_layers=[15], thresholds=[], codecs=["int8o"], edge_precisions=["q4"], loops=[], fixed_drafts=[])
    assert bare.grid_settings() == []  # nothing beside the headline


def test_followup_profiles_rerun_the_fastest_faithful_setting_of_each_loop() -> None:
    rows = [_row((15, 0.5, "int8o"), 0.90, 0.8, 200), _row((20, 0.8, "int8o"), 0.985, 1.2, 150),
            _row((20, 0.95, "int8o"), 0.999, 1.0, 300), _row((25, 0.9, "int8o"), 0.95, 0.9, 100),
            _row((20, 0.5, "int8o"), 1.0, 1.1, 300, loop="lossless"), _row((20, 0.6, "int8o"), 1.0, 1.3, 300, loop="lossless")]
    assert [s.key for s in bm.followup_settings(rows, 4)] == [
        "K20/t0.95/int8o/fp32/exit", "K20/t0.5/int8o/fp32/lossless16", "K20/t0.8/int8o/fp32/exit", "K20/t0.6/int8o/fp32/lossless16"]
    assert [s.key for s in bm.followup_settings(rows, 6)][-2:] == ["K25/t0.9/int8o/fp32/exit", "K15/t0.5/int8o/fp32/exit"]


def test_quick_is_small_and_keeps_the_headline() -> None:
    quick = bench.config_from_args(bench.build_parser().parse_args(["--quick"]))
    headline = quick.headline_settings({15: 0.85})
    assert quick.quick and quick.prompts <= 4 and quick.profiles == ["wan"] and quick.grid_settings({15: 0.85}) == []
    assert [s.key for s in headline] == ["K15/t0.85/int8o/q4/lossless16", "K15/t0.85/int8o/q4/exit"]


def test_core_plan_pins_the_cloud_side_apart_from_the_edge() -> None:
    import subprocess
    import sys

    from offramp.bench.processes import CorePlan

    plan = CorePlan.split()
    if not plan.edge:
        pytest.skip("one core: nothing to pin apart")
    assert not set(plan.edge) & set(plan.cloud)
    child = subprocess.run([sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
                           capture_output=True, text=True, preexec_fn=plan.cloud_preexec(), check=True)
    assert json.loads(child.stdout) == list(plan.cloud)


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
        "inprocess": {"headline": bm.headline_of(rows[1]), "headline_rows": [bm.headline_of(rows[1])],
                      "summary": bm.summary_of(bm.best_setting(rows, "inprocess"), 64), "rows": [r.to_dict() for r in rows]},
    }
    json.dumps(results)  # serialisable as written
    bench_report.write_report(results, tmp_path)
    report = (tmp_path / "report.md").read_text()
    assert "| inprocess | 2 | 2 | fp32 | fp32 | exit | 100.0% |" in report
    h = results["inprocess"]["headline"]
    assert f"| inprocess | K2/t2/fp32/fp32/exit | {h['latency_ratio']:.2f} | {h['ttft_ratio']:.2f} |" in report  # the headline table
    assert (tmp_path / "pareto.png").stat().st_size > 1000 and (tmp_path / "scaling.png").exists()


def test_bench_end_to_end_against_a_real_cloud_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`offramp bench compare` (what `scripts/bench` runs) on a tiny checkpoint: `offramp cloud serve` and the link emulator as processes,
    cloud-only over HTTP, collaborative over the WebSocket link, every loop, clients, results.json with its headline
    and the report; edge and cloud pinned to different cores."""
    monkeypatch.setenv("OFFRAMP_HOME", str(tmp_path / "home"))  # nothing lands in the real artifact cache
    model_dir = save_tiny_checkpoint(tmp_path / "tiny", num_layers=4)
    out = tmp_path / "results"
    assert cli_main(["bench", "compare", "--model", str(model_dir), "--profiles", "lan", "--exit-layers", "2", "--edge-precisions", "fp32",
                       "--heads", "none", "--prompts", "2", "--max-new-tokens", "6", "--thresholds", "0.02,2",
                       "--codecs", "fp32", "--loops", "exit-eager", "--fixed-drafts", "2", "--max-draft", "3",
                       "--clients", "1,2", "--no-edge-step", "--out", str(out)]) == 0
    run = next(out.iterdir())
    results = json.loads((run / "results.json").read_text())
    assert results["meta"]["cloud"] == "offramp cloud serve"
    assert results["meta"]["command"].startswith("offramp bench compare --model ")
    rows = {r["key"]: r for r in results["lan"]["rows"]}
    cloud = rows["cloud-only"]
    assert cloud["errors"] == 0 and cloud["agreement"] == 1.0 and cloud["tokens"] == 12  # the server's full model
    assert cloud["cloud_cpu_s"] > 0 and cloud["wire_up"] > 0 and cloud["wire_down"] > 0  # measured, not modeled
    never_exit = rows["K2/t2/fp32/fp32/exit"]
    assert never_exit["agreement"] == 1.0 and never_exit["exit_rate"] == 0.0
    assert never_exit["cloud_compute_ratio"] == pytest.approx(0.5)  # 2 of 4 layers for every position, prompt included
    assert rows["K2/t0.9/fp32/fp32/lossless3"]["agreement"] == 1.0 and rows["K2/t0.9/fp32/fp32/lossless-fixed2"]["agreement"] == 1.0
    assert {"K2/t0.02/fp32/fp32/exit", "K2/t0.9/fp32/fp32/exit", "K2/t0.9/fp32/fp32/exit-eager", "edge-only K2/int8"} <= set(rows)
    headline = results["lan"]["headline"]
    assert set(bm.HEADLINE_KEYS) <= set(headline) and headline["setting"] == "K2/t0.9/fp32/fp32/lossless3"
    assert headline["exit_layer"] == 2 and headline["agreement"] == 1.0 and headline["tokens_per_round_trip"] > 0
    assert [h["setting"] for h in results["lan"]["headline_rows"]] == ["K2/t0.9/fp32/fp32/lossless3", "K2/t0.9/fp32/fp32/exit"]
    assert isinstance(results["meta"]["cores"], dict)  # this machine has 2 cores: edge and cloud pinned apart
    assert all(r["errors"] == 0 for r in rows.values())
    assert results["lan"]["summary"]["exit_layer"] == 2 and "loop" in results["lan"]["summary"]
    assert [(c["clients"], c["mode"], c["errors"]) for c in results["clients"]] == [
        (1, "cloud-only", 0), (1, "collaborative", 0), (2, "cloud-only", 0), (2, "collaborative", 0)]
    assert "| lan |" in (run / "report.md").read_text()
