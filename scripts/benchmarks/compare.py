"""`offramp bench compare` (`scripts/bench`): collaborative vs cloud-only vs edge-only, over emulated networks, in one run, side by side.

For each link profile the bench starts real `offramp cloud serve` processes (one per exit layer) behind the
link emulator (its own process, profile switched through its control port), and runs on the same held-out
prompts:
- cloud-only: the prompt goes up, the cloud's full model streams tokens back (`POST /v1/completions`);
- edge-only: layers 0..K-1 + exit head, no cloud (no network; measured once, shown with every profile);
- collaborative: the real decode loop with a `WebSocketCloudLink`: the headline (lossless with every default at
  each exit layer K <= N/2, and exit mode at the calibrated threshold), then a grid of thresholds, codecs, edge
  precisions, fixed speculation depths and exit-mode catch-up (`BenchConfig`).
Then the multi-client runs (N concurrent edges against one cloud vs N cloud-only clients), the edge step
micro-benchmark, and `bench-results/<timestamp>/` with results.json, report.md and PNG plots.

Conditions are identical for every mode: one intra-op thread per process, same prompts, same token budget,
warm connections. The edge (this process) and the cloud servers are pinned to different cores, as they are
different machines in a deployment (`--no-pin` lets them share; results.json's meta says which); the link
emulator floats. `results.json` carries `<profile>.headline` (`modes.HEADLINE_KEYS`) for the default mode at K0.
`--cloud inprocess` runs the same modes with no network and no processes (a smoke test of the pieces).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from offramp.bench import modes as bm
from offramp.bench.processes import CloudServer, CorePlan, EmulatedLink, one_thread_env
from offramp.bench import report as bench_report
from offramp.edge.precision import resolve_precision
from offramp.shared.exit_rule import DEFAULT_MAX_PROB_THRESHOLD
from offramp.shared.tokens import stop_token_ids

PROFILE_NAMES = ("lan", "wan", "cellular")


@dataclass
class BenchConfig:
    """Everything one run measures; the defaults are the full bench, `quick_config()` the 3-minute one.

    Every profile runs the headline (`headline_settings`): the default collaborative mode (lossless, the q4 graph,
    the default codec, the adaptive speculation controller) at each exit layer, and exit mode at K0's calibrated
    threshold, beside cloud-only. The grid profile also runs the grid (`grid_settings`) at K0; the other profiles
    re-run its `followup_top` best settings.
    """

    model: str = "default"
    prompts: int = 16
    max_new_tokens: int = 48
    profiles: list[str] = field(default_factory=lambda: list(PROFILE_NAMES))
    # K <= N/2: a real split, the edge holds at most half the model. K0 (the first) is where the grid compares.
    exit_layers: list[int] = field(default_factory=lambda: [15, 10])
    # Exit-mode thresholds at K0 besides its calibrated one (2.0 never exits: a round trip per token).
    thresholds: list[float] = field(default_factory=lambda: [0.95])
    codecs: list[str] = field(default_factory=lambda: ["int8o", "fp16", "fp32"])  # the first is the default; the rest run lossless at K0
    # The first is the collaborative default (`--edge-precision auto`); the rest run lossless at K0. Edge-only runs
    # the standalone graph (auto without a cloud).
    edge_precisions: list[str] = field(default_factory=lambda: ["q4", "fp32", "int8"])
    loops: list[str] = field(default_factory=lambda: ["exit-eager"])  # exit-mode loops at K0 beside the headline's `exit`
    fixed_drafts: list[int] = field(default_factory=lambda: [4, 8])  # lossless at K0 at a fixed depth beside the controller
    max_draft: int = 16  # lossless: drafts ahead of the last confirmed token, at most
    heads: str = "auto"  # auto: trained exit heads + calibrated rule where present; none: final-norm baseline
    cloud: str = "serve"  # serve | inprocess
    clients: list[int] = field(default_factory=lambda: [1, 4, 16, 32])
    clients_profile: str = "wan"
    grid_profile: str = "wan"  # the grid runs here; other profiles get the headline + the `followup_top` best settings
    followup_top: int = 2  # the fastest faithful setting of each loop first (see followup_settings); <= 0: the full grid
    headline_only: bool = False  # the headline alone on every profile (no grid, no clients, no edge-step bench)
    pin_cores: bool = True  # edge (this process) and cloud servers on different cores, as on different machines
    requests_per_client: int = 1
    edge_step_bench: bool = True
    out_root: Path = Path("bench-results")  # under the working directory (scripts/bench: the checkout)
    quick: bool = False

    @classmethod
    def quick_config(cls) -> "BenchConfig":
        return cls(prompts=4, max_new_tokens=24, profiles=["wan"], exit_layers=[15], thresholds=[], codecs=["int8o"],
                   edge_precisions=["q4"], loops=[], fixed_drafts=[], clients=[1, 4], quick=True)

    def _threshold(self, k: int, calibrated: dict[int, float]) -> float:
        return round(calibrated[k], 4) if k in calibrated else DEFAULT_MAX_PROB_THRESHOLD

    def headline_settings(self, calibrated: dict[int, float] | None = None) -> list[bm.Setting]:
        """Lossless with every default at each K, then exit mode (`--no-lossless`) at K0's calibrated threshold."""
        calibrated = calibrated or {}
        lossless = [bm.Setting.with_loop("lossless", k, self._threshold(k, calibrated), self.codecs[0],
                                         self.edge_precisions[0], self.max_draft) for k in self.exit_layers]
        k0 = self.exit_layers[0]
        return lossless + [bm.Setting.with_loop("exit", k0, self._threshold(k0, calibrated), self.codecs[0],
                                                self.edge_precisions[0], self.max_draft)]

    def grid_settings(self, calibrated: dict[int, float] | None = None) -> list[bm.Setting]:
        """Beside the headline: exit mode at every threshold (K0) and each K's calibrated one, the other exit loops
        at K0; lossless at K0 with each other codec, precision and fixed depth."""
        calibrated = calibrated or {}
        k0 = self.exit_layers[0]
        t0 = self._threshold(k0, calibrated)
        first = dict(codec=self.codecs[0], edge_precision=self.edge_precisions[0])

        def setting(loop: str, k: int = k0, t: float = t0, codec: str | None = None, precision: str | None = None,
                    fixed: int = 0) -> bm.Setting:
            return bm.Setting.with_loop(loop, k, t, codec or first["codec"], precision or first["edge_precision"],
                                        self.max_draft, fixed)

        settings = [setting("exit", t=t) for t in sorted(set(self.thresholds))]
        settings += [setting("exit", k, self._threshold(k, calibrated)) for k in self.exit_layers[1:]]
        settings += [setting(loop) for loop in self.loops]
        settings += [setting("lossless", codec=c) for c in self.codecs[1:]]
        settings += [setting("lossless", precision=p) for p in self.edge_precisions[1:]]
        settings += [setting("lossless", fixed=n) for n in self.fixed_drafts if n <= self.max_draft]
        headline = set(self.headline_settings(calibrated))
        return [s for s in dict.fromkeys(settings) if s not in headline]


# --------------------------------------------------------------------------------------------------- the edge side


class Edge:
    """The bench process's edge: the model (for the judge and the exports), edge directories per K, exit rules.

    Every measured request runs through `offramp.edge.service.EdgeService`, built from an `EdgeConfig` exactly as
    `offramp generate`, the daemon and the SDK build theirs (same graph, rule, stop ids, decode loop); the bench
    only wraps the runtime and the link to time steps and round trips.
    """

    def __init__(self, cfg: BenchConfig, model=None, tokenizer=None) -> None:
        import torch

        torch.set_num_threads(1)
        from offramp.models import load_model

        self.cfg = cfg
        self.model, self.tokenizer = (model, tokenizer) if model is not None else load_model(cfg.model)
        self.num_layers = self.model.config.num_hidden_layers
        self.hidden_size = self.model.config.hidden_size
        self.judge = bm.AgreementJudge(self.model)
        # Where the cloud's completions endpoint stops too (offramp.shared.tokens), as the edge service does.
        self.stop_ids = list(stop_token_ids(self.tokenizer))
        self._dirs: dict[int, Path] = {}
        self._setups: dict[int, object] = {}
        self.precision_used: dict[str, str] = {}
        self.exit_rule: dict[int, str] = {}
        self.calibrated: dict[int, float] = {}  # K -> the threshold `offramp calibrate` chose
        self.notes: list[str] = []  # what the report must say (e.g. no trained head: the final-norm rule measured)

    def edge_dir(self, k: int, precisions: tuple[str, ...] | None = None) -> Path:
        """The edge directory for K (exported into the cache with the graphs the settings need, before any timing)."""
        from offramp.models.edge_dir import ensure_edge_dir

        wanted = list(precisions or self.cfg.edge_precisions)
        self._dirs[k], _ = ensure_edge_dir(self.cfg.model, k, wanted, use_trained=self.cfg.heads != "none",
                                           loaded=(self.model, self.tokenizer), progress=False)
        return self._dirs[k]

    def exit_setup(self, k: int):
        """The exit rule the edge directory for K carries (the trained head's calibration, found the way `offramp
        generate` finds it) unless `--heads none`; without one the final-norm head and max-prob."""
        if k not in self._setups:
            from offramp.edge.exit_setup import UNTRAINED_HEAD, resolve_exit_setup
            from offramp.shared.edge_dir import EdgeDirManifest

            edge_dir = self._dirs.get(k) or self.edge_dir(k)
            setup = resolve_exit_setup(edge_dir, EdgeDirManifest.read(edge_dir))
            self._setups[k] = setup
            d = setup.describe()
            self.exit_rule[k] = f"{d['head']}, {d['rule']} rule, threshold {d['threshold']:.4g} ({d['threshold_source']})"
            if setup.threshold_source == "calibrated":
                self.calibrated[k] = float(setup.threshold)
            elif self.cfg.heads != "none":
                self.notes.append(f"K={k}: no calibrated trained exit head under {self._artifacts(k)}; "
                                  "the final-norm head with max-prob is measured instead (run offramp train-exits and calibrate)"
                                  if setup.head == UNTRAINED_HEAD else f"K={k}: trained head {setup.head} is not calibrated")
                print(f"[bench] note: {self.notes[-1]}", flush=True)
        return self._setups[k]

    def _artifacts(self, k: int) -> Path:
        from offramp.models.fingerprint import model_fingerprint
        from offramp.shared.paths import artifacts_dir

        return artifacts_dir(model_fingerprint(self.model), k)

    def open_service(self, setting: bm.Setting, cloud: str, record: bool = False):
        """The edge service for one setting: `cloud` is 'none', 'local' or the ws:// URL of the emulated link.

        One intra-op thread and one worker, so edge steps cost what they cost in the other modes; the ONNX session
        of a graph is shared by every setting that runs it (offramp.edge.onnx_runtime)."""
        from offramp.edge.config import EdgeConfig
        from offramp.edge.service import EdgeService

        config = EdgeConfig(
            edge=self._dirs.get(setting.exit_layer) or self.edge_dir(setting.exit_layer), precision=setting.edge_precision,
            cloud=cloud, codec=setting.codec if cloud != "none" else "fp32", threshold=setting.threshold, max_sessions=1,
            workers=1, edge_threads=1, catch_up=setting.catch_up, lossless=setting.lossless, max_draft=setting.max_draft,
            fixed_draft=setting.fixed_draft,
        )
        service = EdgeService.open(config, loaded=(self.model, self.tokenizer), wrap_runtime=bm.TimedRuntime,
                                   wrap_link=lambda link: bm.CountingLink(link, record=record))
        head = self.exit_setup(setting.exit_layer).head
        self.precision_used[f"K{setting.exit_layer}/{setting.edge_precision}"] = f"{service.precision} ({head})"
        return service

    def judge_result(self, prompt: bm.BenchPrompt, result: bm.RequestResult, max_new_tokens: int) -> None:
        """Teacher-forced agreement and exact match against the full model."""
        agree, n = self.judge.agreement(prompt.input_ids, result.token_ids)
        result.agree = agree
        ended = n == max_new_tokens or (n > 0 and result.token_ids[-1] in self.stop_ids)
        result.exact = n > 0 and agree == n and ended


# --------------------------------------------------------------------------------------------------- backends


class InProcessBackend:
    """No network: cloud-only runs the full model here, collaborative runs `--cloud local` (offramp.cloud.local_link)."""

    name = "inprocess"

    def __init__(self, edge: Edge) -> None:
        self.edge = edge

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def set_profile(self, profile: str) -> None: ...

    def cpu(self, k: int | None) -> float | None:
        return None

    def wire(self, k: int | None) -> tuple[int, int] | None:
        return None

    async def cloud_only(self, prompt: bm.BenchPrompt, n: int) -> bm.RequestResult:
        return bm.run_cloud_only_inprocess(self.edge.model, prompt, n, self.edge.stop_ids)

    def cloud_url(self, k: int) -> str:
        return "local"

    async def close(self) -> None: ...


class ServedBackend:
    """Real `offramp cloud serve` processes, one per exit layer, each behind its own link-emulator process."""

    name = "offramp cloud serve"

    def __init__(self, edge: Edge, cfg: BenchConfig, out: Path, cores: CorePlan | None = None) -> None:
        self.edge, self.cfg = edge, cfg
        self.servers = {k: CloudServer(cfg.model, k, log_path=out / f"cloud-k{k}.log", cores=cores or CorePlan())
                        for k in cfg.exit_layers}
        self.links: dict[int, EmulatedLink] = {}
        self._EmulatedLink = EmulatedLink
        self._http = None
        self.base_k = cfg.exit_layers[0]

    def start(self) -> None:
        for k, server in self.servers.items():  # all load their model at once, then each is waited for
            print(f"[bench] starting cloud server K={k} on :{server.port}", flush=True)
            server.launch()
        for k, server in self.servers.items():
            server.wait_healthy()
            self.links[k] = self._EmulatedLink(server.port, "lan").start()

    def stop(self) -> None:
        for link in self.links.values():
            link.stop()
        for server in self.servers.values():
            server.stop()

    def set_profile(self, profile: str) -> None:
        for link in self.links.values():
            link.set_profile(profile)

    def cpu(self, k: int | None) -> float | None:
        return self.servers[k if k is not None else self.base_k].cpu_seconds()

    def wire(self, k: int | None) -> tuple[int, int] | None:
        return self.links[k if k is not None else self.base_k].wire_bytes()

    async def cloud_only(self, prompt: bm.BenchPrompt, n: int) -> bm.RequestResult:
        import aiohttp

        if self._http is None:
            self._http = aiohttp.ClientSession()
        url = f"http://127.0.0.1:{self.links[self.base_k].port}/v1/completions"
        return await bm.run_cloud_only_http(self._http, url, prompt, n, self.edge.num_layers)

    def cloud_url(self, k: int) -> str:
        return f"ws://127.0.0.1:{self.links[k].port}"

    async def open_link(self, k: int, codec: str, precision: str):
        """A bare link for replayed clients (recorded traces, no decode loop: see run_clients)."""
        from offramp.edge.ws_link import WebSocketCloudLink
        from offramp.shared.edge_dir import EdgeDirManifest
        from offramp.shared.edge_manifest import read_manifest

        edge_dir = self.edge.edge_dir(k)
        graph = edge_dir / EdgeDirManifest.read(edge_dir).graphs[precision]
        return WebSocketCloudLink(self.cloud_url(k), codec=codec, manifest=read_manifest(graph))

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


# --------------------------------------------------------------------------------------------------- runs


class ModeRunner:
    """One mode (and setting) on one profile: open once, run any prompt, close, then one report row.

    Modes are run interleaved, prompt by prompt (`run_interleaved`), so that a burst of load from other work on
    this machine lands on every mode alike instead of on whichever mode happened to run then.
    """

    def __init__(self, backend, edge: Edge, cfg: BenchConfig, profile: str, mode: str,
                 setting: bm.Setting | None = None, traces: dict | None = None) -> None:
        """`setting`: the collaborative one, or for edge-only its K and precision; none for cloud-only."""
        self.backend, self.edge, self.cfg = backend, edge, cfg
        self.profile, self.mode, self.setting = profile, mode, setting
        self.traces = traces
        self.service = None  # the edge service of this setting (offramp.edge.service.EdgeService)
        self.link: bm.CountingLink | None = None
        self.results: list[bm.RequestResult] = []

    async def open(self) -> None:
        if self.mode in ("collaborative", "edge-only"):
            cloud = self.backend.cloud_url(self.setting.exit_layer) if self.mode == "collaborative" else "none"
            self.service = await asyncio.to_thread(self.edge.open_service, self.setting, cloud, self.traces is not None)
            self.link = self.service.link

    async def close(self) -> None:
        if self.service is not None:
            await self.service.aclose()
            self.service, self.link = None, None

    async def _request(self, prompt: bm.BenchPrompt, n: int) -> bm.RequestResult:
        if self.mode == "cloud-only":
            return await self.backend.cloud_only(prompt, n)
        if self.link is not None:
            self.link.mark()
        result = await bm.run_request(self.service, prompt, n)
        if self.link is not None and self.traces is not None:
            self.traces[prompt.prompt_id] = (list(self.link.trace), time.perf_counter() - self.link._last, result.tokens, result.latency_s)
        return result

    async def run(self, prompt: bm.BenchPrompt, measure: bool = True) -> bm.RequestResult | None:
        """One request; its cloud CPU seconds and wire bytes are read around it (nothing else runs meanwhile)."""
        cloud_k = self.setting.exit_layer if self.mode == "collaborative" else None
        counted = self.mode != "edge-only"
        cpu0 = self.backend.cpu(cloud_k) if counted else None
        wire0 = self.backend.wire(cloud_k) if counted else None
        try:
            # A warm-up (connections, session tables, first-call allocations) needs a few tokens, not all of them.
            result = await self._request(prompt, self.cfg.max_new_tokens if measure else min(8, self.cfg.max_new_tokens))
        except Exception as exc:  # a failed request is a result, not a crashed bench
            result = bm.RequestResult(prompt.prompt_id, [], 0.0, 0.0, error=f"{type(exc).__name__}: {exc}")
        if not measure:
            return None
        if cpu0 is not None:
            result.cloud_cpu_s = self.backend.cpu(cloud_k) - cpu0
        if wire0 is not None:
            w = self.backend.wire(cloud_k)
            result.wire_up, result.wire_down = w[0] - wire0[0], w[1] - wire0[1]
        if result.error is None:
            self.edge.judge_result(prompt, result, self.cfg.max_new_tokens)
        self.results.append(result)
        return result

    def row(self) -> bm.ModeRow:
        row = bm.aggregate(bm.ModeRow.of(self.mode, self.profile, self.setting), self.results, 0.0)
        if self.mode == "edge-only":
            row.cloud_cpu_s, row.wire_up, row.wire_down = 0.0, 0, 0
        print(f"[bench] {self.profile:>8} {row.key:<36} p50 {row.latency_p50_s:6.2f}s ttft {row.ttft_p50_s:5.3f}s "
              f"agree {row.agreement:6.1%} exit {row.exit_rate:5.1%} layer-tok {row.cloud_layer_tokens} "
              f"up/tok {row.bytes_up_per_token:7.0f}B errors {row.errors}", flush=True)
        return row


async def run_interleaved(runners: list[ModeRunner], prompts) -> list[bm.ModeRow]:
    """Warm every mode up on the first prompt (not measured), then prompt by prompt, every mode in turn."""
    for r in runners:
        await r.open()
    try:
        for r in runners:
            await r.run(prompts[0], measure=False)
        for i, prompt in enumerate(prompts, 1):
            for r in runners:
                await r.run(prompt)
            print(f"[bench]   {runners[0].profile}: prompt {i}/{len(prompts)} done in every mode", flush=True)
    finally:
        for r in runners:
            await r.close()
    return [r.row() for r in runners]


async def run_mode(backend, edge: Edge, cfg: BenchConfig, prompts, profile: str, mode: str,
                   setting: bm.Setting | None = None) -> bm.ModeRow:
    """One mode alone over every prompt."""
    runner = ModeRunner(backend, edge, cfg, profile, mode, setting)
    return (await run_interleaved([runner], prompts))[0]


async def run_clients(backend, edge: Edge, cfg: BenchConfig, prompts, traces: dict, setting: bm.Setting | None) -> list[dict]:
    """N concurrent clients, cloud-only vs collaborative (replayed edges), on `cfg.clients_profile`.

    Collaborative clients replay recorded edge traces: the same uploads at the same moments, with the edge's
    compute as a sleep. N real edges would be N devices; running N edge runtimes on this machine's two cores
    would measure CPU contention, not the cloud. Cloud-only clients are plain streaming HTTP clients. A replay
    waits for every reply in turn (eager catch-up's background uploads included), so it is the loop's
    sequential shape at the recorded gaps.
    """
    if isinstance(backend, InProcessBackend):
        return []
    backend.set_profile(cfg.clients_profile)
    out = []
    for n_clients in cfg.clients:
        for mode in ("cloud-only", "collaborative"):
            if mode == "collaborative" and (setting is None or not traces):
                continue
            k = setting.exit_layer if mode == "collaborative" else None
            jobs = [(c, prompts[(c + r) % len(prompts)]) for c in range(n_clients) for r in range(cfg.requests_per_client)]
            cpu0, wire0 = backend.cpu(k), backend.wire(k)
            started = time.perf_counter()
            if mode == "cloud-only":
                async def client(c: int) -> list:
                    res = []
                    for cc, prompt in jobs:
                        if cc == c:
                            res.append(await backend.cloud_only(prompt, cfg.max_new_tokens))
                    return res
            else:
                async def client(c: int) -> list:
                    link = await backend.open_link(setting.exit_layer, setting.codec, setting.edge_precision)
                    res = []
                    try:
                        for cc, prompt in jobs:
                            if cc == c and prompt.prompt_id in traces:
                                res.append(await replay(link, traces[prompt.prompt_id], prompt))
                    finally:
                        await link.aclose()
                    return res
            gathered = await asyncio.gather(*(client(c) for c in range(n_clients)), return_exceptions=True)
            wall = time.perf_counter() - started
            results = [r for g in gathered if isinstance(g, list) for r in g]
            errors = sum(isinstance(g, BaseException) for g in gathered) + sum(r.error is not None for r in results)
            lat = [r.latency_s for r in results if r.error is None]
            tokens = sum(r.tokens for r in results if r.error is None)
            row = {
                "mode": mode, "clients": n_clients, "requests": len(results), "errors": errors, "tokens": tokens,
                "wall_s": wall, "throughput_tok_s": tokens / wall if wall > 0 else 0.0,
                "latency_p50_s": bm.percentile(lat, 50), "latency_p99_s": bm.percentile(lat, 99),
                "cloud_cpu_s": (backend.cpu(k) - cpu0) if cpu0 is not None else None,
                "setting": None if mode == "cloud-only" else {**asdict(setting), "key": setting.key},
            }
            if wire0 is not None:
                w = backend.wire(k)
                row["wire_up"], row["wire_down"] = w[0] - wire0[0], w[1] - wire0[1]
            print(f"[bench] clients {n_clients:>3} {mode:<13} {row['throughput_tok_s']:7.1f} tok/s "
                  f"p50 {row['latency_p50_s']:6.2f}s p99 {row['latency_p99_s']:6.2f}s errors {errors}", flush=True)
            out.append(row)
    return out


async def replay(link, trace, prompt: bm.BenchPrompt) -> bm.RequestResult:
    """One recorded collaborative request, again: same uploads after the same edge compute (slept, not run)."""
    import uuid

    from offramp.shared.contract import ExtendRequest

    events, tail, tokens, _ = trace
    session = uuid.uuid4().hex
    started = time.perf_counter()
    first = None
    await link.open_session(session)
    try:
        for gap, start, hidden, want_token in events:
            await asyncio.sleep(gap)
            await link.extend(ExtendRequest(session, start, hidden, want_token=want_token))
            first = first or time.perf_counter() - started
        await asyncio.sleep(tail)
    finally:
        await link.close_session(session)
    latency = time.perf_counter() - started
    return bm.RequestResult(prompt.prompt_id, [0] * tokens, first or latency, latency)


def edge_step_microbench(cfg: BenchConfig, out: Path, edge: Edge) -> dict:
    """`offramp bench edge-step` in its own one-thread process (its JSON), else a PyTorch-only fallback."""
    from offramp.shared.paths import offramp_home

    target = out / "edge_step.json"
    # Graphs exported under a stable directory, so only the first run pays for the exports.
    cmd = [sys.executable, "-m", "offramp.bench.edge_step", "--json", str(target), "--threads", "1", "--exit-layers",
           *[str(k) for k in cfg.exit_layers], "--steps", "20" if cfg.quick else "100",
           "--out", str(offramp_home() / "bench-edge-step")]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=one_thread_env())
        (out / "edge_step.log").write_text(proc.stdout + proc.stderr)
        if proc.returncode == 0 and target.exists():
            return {"source": "offramp bench edge-step", **json.loads(target.read_text())}
        note = f"offramp bench edge-step exited {proc.returncode} (see edge_step.log)"
    except subprocess.TimeoutExpired:
        note = "offramp bench edge-step timed out"
    return {"source": "bench fallback (torch step only)", "note": note, **_torch_step(edge, cfg)}


def _torch_step(edge: Edge, cfg: BenchConfig) -> dict:
    import numpy as np

    rows = []
    for k in cfg.exit_layers[:1]:
        from offramp.models.reference_runtime import reference_runtime

        rt = reference_runtime(edge.model, k)
        rt.run(list(range(1, 65)))
        times = []
        for i in range(30 if not cfg.quick else 10):
            t = time.perf_counter()
            rt.run([100 + i])
            times.append(time.perf_counter() - t)
        params = sum(p.numel() for p in rt.edge.parameters()) if hasattr(rt, "edge") else 0
        a = np.ones(64 << 20, dtype=np.uint8)
        t = time.perf_counter()
        for _ in range(5):
            a.copy()
        bw = 2 * a.nbytes * 5 / (time.perf_counter() - t)  # read + write
        rows.append({"exit_layer": k, "precision": "torch-fp32", "step_ms_p50": 1e3 * float(np.median(times)),
                     "weights_bytes": 4 * params, "memory_bandwidth_gbs": bw / 1e9,
                     "floor_ms": 1e3 * 4 * params / bw})
    return {"rows": rows}


# --------------------------------------------------------------------------------------------------- main


async def run_bench(cfg: BenchConfig, out: Path, command: str = "offramp bench compare",
                    cores: CorePlan | None = None) -> dict:
    """Every mode over the held-out prompts; `cores` pins the cloud servers (this process was pinned by main)."""
    cores = cores or CorePlan()
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    edge = Edge(cfg)
    prompts, origin = bm.held_out_prompts(edge.tokenizer, cfg.prompts)
    print(f"[bench] {len(prompts)} prompts ({origin}), {cfg.max_new_tokens} new tokens, out {out}", flush=True)
    backend = InProcessBackend(edge) if cfg.cloud == "inprocess" else ServedBackend(edge, cfg, out, cores)
    profiles = ["inprocess"] if cfg.cloud == "inprocess" else cfg.profiles
    rows: list[bm.ModeRow] = []
    traces: dict[bm.Setting, dict] = {}
    clients: list[dict] = []
    phases: list[dict] = []  # when each phase ended and the machine's load then: other work shares these cores

    def mark(name: str) -> None:
        phases.append({"phase": name, "end_s": round(time.perf_counter() - t_start, 1), "load1": os.getloadavg()[0]})
        print(f"[bench] {name} done at {phases[-1]['end_s']:.0f} s (load {phases[-1]['load1']:.1f})", flush=True)

    backend.start()
    mark("start")
    try:
        for k in cfg.exit_layers:  # exit rules (and calibrated thresholds) first: they add settings
            edge.exit_setup(k)
        headline = cfg.headline_settings(edge.calibrated)
        grid = [] if cfg.headline_only else cfg.grid_settings(edge.calibrated)
        print(f"[bench] headline: {[s.key for s in headline]}; {len(grid)} grid settings on {cfg.grid_profile}", flush=True)
        # Edge-only runs what a lone edge would: `--edge-precision auto` without a cloud.
        standalone = resolve_precision("auto", "none")
        alone = [bm.Setting(k, 0.0, "none", standalone) for k in cfg.exit_layers]  # no link: every token exits
        for k in cfg.exit_layers:  # export every graph the settings need before any timing
            edge.edge_dir(k, tuple(dict.fromkeys([s.edge_precision for s in headline + grid + alone if s.exit_layer == k])))
        mark("edge runtimes")
        edge_only = [await run_mode(backend, edge, cfg, prompts, "none", "edge-only", s) for s in alone]
        mark("edge-only")
        order = sorted(profiles, key=lambda p: p != cfg.grid_profile)  # the grid profile first
        for profile in order:
            backend.set_profile(profile)
            settings = headline + grid
            if cfg.followup_top > 0 and profile != order[0]:
                grid_rows = [r for r in rows if r.profile == order[0] and r.setting() not in headline]
                settings = headline + bm.followup_settings(grid_rows, cfg.followup_top)
            runners = [ModeRunner(backend, edge, cfg, profile, "cloud-only")]
            for s in dict.fromkeys(settings):
                rec = traces.setdefault(s, {}) if profile == cfg.clients_profile else None
                runners.append(ModeRunner(backend, edge, cfg, profile, "collaborative", s, rec))
            rows += await run_interleaved(runners, prompts)
            rows += [bm.ModeRow(**{**asdict(e), "profile": profile}) for e in edge_only]
            mark(profile)
        bm.compare_to_baseline(rows)
        best = {p: bm.best_setting(rows, p) for p in profiles}
        target = best.get(cfg.clients_profile) or next(
            (r for r in rows if r.profile == cfg.clients_profile and r.mode == "collaborative"), None)
        setting = target.setting() if target is not None else None
        if not cfg.headline_only:
            clients = await run_clients(backend, edge, cfg, prompts, traces.get(setting, {}), setting)
            mark("clients")
        await backend.close()
    finally:
        backend.stop()
    edge_step = edge_step_microbench(cfg, out, edge) if cfg.edge_step_bench and not cfg.headline_only else {}
    mark("edge step")
    results = {
        "meta": {
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": command,
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
            "prompts": [{"id": p.prompt_id, "source": p.source, "text": p.text, "tokens": len(p.input_ids)} for p in prompts],
            "prompt_origin": origin,
            "model": cfg.model, "num_layers": edge.num_layers, "hidden_size": edge.hidden_size,
            "edge_precision": {str(k): v for k, v in edge.precision_used.items()},
            "exit_rule": {str(k): v for k, v in edge.exit_rule.items()},
            "cloud": cfg.cloud if cfg.cloud == "inprocess" else backend.name, "cpu_count": os.cpu_count(), "platform": platform.platform(),
            "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "phases": phases,
            "notes": edge.notes,
            "cores": {"edge (this process)": list(cores.edge), "cloud servers": list(cores.cloud),
                      "link emulator": "unpinned"} if cores.edge else "not pinned",
            "git": _git_rev(), "elapsed_s": time.perf_counter() - t_start,
            "agreement_definition": "teacher-forced: share of emitted tokens equal to the full model's greedy choice after the same prefix",
        },
        "clients": clients,
        "edge_step": edge_step,
    }
    for profile in profiles:
        mine = [r for r in rows if r.profile == profile]
        lines = [r for s in headline for r in mine if r.mode == "collaborative" and r.setting() == s]
        results[profile] = {
            # The default collaborative mode at K0 (the keys), then every headline row.
            "headline": bm.headline_of(lines[0]) if lines else None,
            "headline_rows": [bm.headline_of(r) for r in lines],
            "summary": bm.summary_of(best.get(profile), edge.hidden_size),
            "rows": [r.to_dict() for r in mine],
        }
    return results


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).resolve().parent, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return ""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="offramp bench compare", description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a small version of everything (under 3 minutes here)")
    p.add_argument("--model", default=None)
    p.add_argument("--prompts", type=int, default=None, help="held-out prompts (half chat, half plain)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--profiles", default=None, help=f"comma list of {PROFILE_NAMES}")
    p.add_argument("--exit-layers", default=None, help="comma list; the first (K0) is where loops, codecs and precisions are compared")
    p.add_argument("--thresholds", default=None, help="comma list: exit-mode thresholds at K0 besides the calibrated one")
    p.add_argument("--codecs", default=None, help="comma list; the first is the headline's (the default), the others run lossless at K0")
    p.add_argument("--edge-precisions", default=None, help="comma list of q4, fp32, int8; the first is the headline's (the collaborative default)")
    p.add_argument("--loops", default=None, help=f"comma list of exit-mode loops at K0 beside the headline, from {bm.LOOPS}")
    p.add_argument("--fixed-drafts", default=None, help="comma list: lossless at K0 also at these fixed speculation depths")
    p.add_argument("--max-draft", type=int, default=None, help="drafts ahead of the last confirmed token, at most")
    p.add_argument("--headline-only", action="store_true", help="cloud-only + the headline settings on every profile, nothing else")
    p.add_argument("--no-pin", action="store_true", help="let edge and cloud share every core (default: pinned apart)")
    p.add_argument("--grid-profile", default=None, help="the profile that runs every setting (default wan)")
    p.add_argument("--followup-top", type=int, default=None, help="settings the other profiles run (<= 0: all)")
    p.add_argument("--cloud", default=None, choices=["serve", "inprocess"])
    p.add_argument("--heads", default=None, choices=["auto", "none"], help="trained exit heads where present, or the final-norm baseline")
    p.add_argument("--clients", default=None, help="comma list of concurrent clients")
    p.add_argument("--clients-profile", default=None)
    p.add_argument("--requests-per-client", type=int, default=None)
    p.add_argument("--no-edge-step", action="store_true")
    p.add_argument("--out", type=Path, default=None, help="results root (default bench-results/)")
    return p


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    cfg = BenchConfig.quick_config() if args.quick else BenchConfig()
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    strs = lambda s: [x for x in s.split(",") if x]  # noqa: E731
    for name, conv in (("model", str), ("prompts", int), ("max_new_tokens", int), ("profiles", strs),
                       ("exit_layers", ints), ("thresholds", floats), ("codecs", strs),
                       ("edge_precisions", strs), ("loops", strs), ("fixed_drafts", ints), ("max_draft", int), ("grid_profile", str), ("followup_top", int), ("heads", str), ("cloud", str), ("clients", ints), ("clients_profile", str),
                       ("requests_per_client", int)):
        value = getattr(args, name)
        if value is not None:
            setattr(cfg, name, conv(value))
    if args.no_edge_step:
        cfg.edge_step_bench = False
    cfg.headline_only = cfg.headline_only or args.headline_only
    cfg.pin_cores = cfg.pin_cores and not args.no_pin
    if args.out is not None:
        cfg.out_root = args.out
    unknown = set(cfg.profiles) - set(PROFILE_NAMES) - {"none"}
    if unknown:
        raise SystemExit(f"unknown profiles {sorted(unknown)}")
    if set(cfg.loops) - set(bm.LOOPS):
        raise SystemExit(f"unknown decode loops {sorted(set(cfg.loops) - set(bm.LOOPS))}; known: {bm.LOOPS}")
    if cfg.clients_profile not in cfg.profiles:
        cfg.clients_profile = cfg.profiles[0]
    if cfg.grid_profile not in cfg.profiles:
        cfg.grid_profile = cfg.profiles[0]
    return cfg


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = config_from_args(build_parser().parse_args(argv))
    out = cfg.out_root / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    cores = CorePlan.split() if cfg.pin_cores and cfg.cloud == "serve" else CorePlan()
    cores.pin_this_process()  # before the first worker thread: the edge's step threads inherit it
    results = asyncio.run(run_bench(cfg, out, shlex.join(["offramp", "bench", "compare", *argv]), cores))
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    bench_report.write_report(results, out)
    print(f"[bench] wrote {out}/results.json, report.md and plots in {results['meta']['elapsed_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
