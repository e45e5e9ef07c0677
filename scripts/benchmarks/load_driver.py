"""The load driver: many edge sessions against one cloud at once, for a bounded time, counting what went wrong.

Each session is a real edge (its own PyTorch edge runtime and its own WebSocket link, as a separate device would
have) running the collaborative decode loop request after request: open, eager catch-up uploads of the tokens
that exited at the edge, escalations of the others, close. Every other token exits, so uploads and escalations
mix. Errors are anything that is not a clean answer from the cloud: a request that raised, a token the edge had
to decide alone (`edge-fallback`: the cloud did not answer in time or refused), a token the cloud decided that
is not the full model's greedy choice (spot-checked, teacher-forced, every `verify_every` requests), and every
error frame the cloud counted. Meanwhile the cloud's RSS (from /proc, when its pid is known) and its KV bytes
(from /healthz) are sampled, so a leak or a budget overrun shows.

`offramp bench soak` (`scripts/soak`) runs this for as long as asked; `tests/reliability/test_load.py` runs it for a minute in CI.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import numpy as np
import torch

from offramp.bench.processes import cpu_seconds
from offramp.edge.decode_loop import CLOUD, EDGE, FALLBACK, CollaborativeDecoder, DecodeOptions
from offramp.models.reference_runtime import TorchEdgeRuntime
from offramp.edge.ws_link import WebSocketCloudLink
from offramp.models.fingerprint import edge_identity
from offramp.models.split import EdgePart

MB = 1 << 20
NEAR_TIE = 1e-3  # logit margin below which a batched and a one-shot forward may legitimately pick differently


@dataclass
class LoadConfig:
    url: str  # ws://HOST:PORT of the cloud
    exit_layer: int = 2
    sessions: int = 64
    duration_s: float = 60.0
    max_new_tokens: int = 32  # per request
    prompt_tokens: int = 8
    codec: str = "fp32"  # lossless, so cloud tokens can be checked exactly
    timeout_s: float = 10.0  # the edge's --cloud-timeout: an answer later than this is a fallback (an error here)
    warmup_s: float = 10.0  # RSS growth is measured from the first sample after this
    sample_s: float = 0.5
    verify_every: int = 4  # teacher-force every n-th request of each session (0: never)
    token: str | None = None
    seed: int = 0


@dataclass
class LoadReport:
    sessions: int
    duration_s: float = 0.0
    requests: int = 0
    tokens: int = 0
    cloud_tokens: int = 0
    edge_tokens: int = 0
    fallback_tokens: int = 0
    failed_requests: int = 0
    wrong_tokens: int = 0
    health_failures: int = 0  # /healthz answers that were not a 200 with the cloud's state
    verified_tokens: int = 0
    cloud_errors: dict[str, int] = field(default_factory=dict)  # error frames the cloud sent during the run, by code
    cloud_escalations: int = 0  # what the cloud counted (its /metrics): escalations answered, upload frames run
    cloud_uploads: int = 0
    evictions: int = 0
    sessions_left: int = -1  # sessions the cloud still holds after every edge closed (-1: unknown)
    kv_bytes_max: int = 0
    kv_budget_bytes: int | None = None
    rss_start: int | None = None
    rss_warm: int | None = None
    rss_end: int | None = None
    rss_peak: int | None = None  # the kernel's high-water mark (VmHWM) over the process's life
    cloud_cpu_s: float | None = None  # CPU seconds the cloud process spent during the run (all threads)
    first_errors: list[str] = field(default_factory=list)

    @property
    def errors(self) -> int:
        return self.failed_requests + self.fallback_tokens + self.wrong_tokens + self.health_failures + sum(self.cloud_errors.values())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.duration_s if self.duration_s else 0.0

    @property
    def rss_growth(self) -> int | None:
        """RSS at the end minus RSS after warm-up: what a leak would add, without start-up and first-use costs."""
        return None if self.rss_end is None or self.rss_warm is None else self.rss_end - self.rss_warm

    def to_dict(self) -> dict[str, Any]:
        return asdict(self) | {"errors": self.errors, "tokens_per_s": round(self.tokens_per_s, 1), "rss_growth": self.rss_growth}

    def summary(self) -> str:
        def mb(value: int | None) -> str:
            return "n/a" if value is None else f"{value / MB:.1f} MB"

        budget = "none" if self.kv_budget_bytes is None else mb(self.kv_budget_bytes)
        lines = [
            f"sessions {self.sessions}, {self.duration_s:.1f} s: {self.requests} requests, {self.tokens} tokens "
            f"({self.tokens_per_s:.1f} tokens/s; cloud {self.cloud_tokens}, edge {self.edge_tokens}, fallback {self.fallback_tokens}); "
            f"the cloud answered {self.cloud_escalations} escalations and {self.cloud_uploads} uploads",
            f"errors {self.errors}: failed requests {self.failed_requests}, fallback tokens {self.fallback_tokens}, "
            f"wrong cloud tokens {self.wrong_tokens} of {self.verified_tokens} checked, health probe failures {self.health_failures}, "
            f"cloud error frames {sum(self.cloud_errors.values())} "
            f"{self.cloud_errors or ''}".rstrip(),
            f"cloud memory: peak RSS {mb(self.rss_peak)} (start {mb(self.rss_start)}, after warm-up {mb(self.rss_warm)}, "
            f"end {mb(self.rss_end)}, growth {mb(self.rss_growth)}); KV max {mb(self.kv_bytes_max)} of budget {budget}, "
            f"{self.evictions} evictions, {self.sessions_left} sessions left after close",
        ]
        if self.cloud_cpu_s is not None and self.duration_s:
            lines.append(f"cloud CPU {self.cloud_cpu_s:.1f} s ({self.cloud_cpu_s / self.duration_s:.0%} of one core)")
        return "\n".join(lines + [f"  error: {e}" for e in self.first_errors])


# -- the cloud process, seen from outside --------------------------------------------------------------------------


def rss_bytes(pid: int) -> tuple[int, int]:
    """(current RSS, peak RSS) of a live process, from /proc/<pid>/status (VmRSS, VmHWM)."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                name, kb, _ = line.split()
                values[name[:-1]] = int(kb) * 1024
    return values["VmRSS"], values["VmHWM"]


def http_base(url: str) -> str:
    """http(s)://host:port of a ws(s):// cloud URL."""
    parts = urlsplit(url)
    return urlunsplit(({"wss": "https"}.get(parts.scheme, "http"), parts.netloc, "", "", ""))


def metric_values(text: str, name: str) -> dict[str, float]:
    """A Prometheus counter's value per label set ('' without labels), from the text format."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            key, value = line.rsplit(" ", 1)
            values[key[len(name) :].strip("{}")] = float(value)
    return values


def counter_delta(before: str, after: str, name: str) -> dict[str, int]:
    """What a counter gained between two scrapes, per label set (only those that moved)."""
    old = metric_values(before, name)
    return {k: int(v - old.get(k, 0.0)) for k, v in metric_values(after, name).items() if v - old.get(k, 0.0) > 0}


class CloudProbe:
    """Samples the cloud while the load runs: /healthz (KV bytes, sessions), /metrics, and its RSS by pid."""

    def __init__(self, url: str, pid: int | None, token: str | None) -> None:
        self.base = http_base(url)
        self.pid = pid
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> "CloudProbe":
        self.http = aiohttp.ClientSession(headers=self.headers, timeout=aiohttp.ClientTimeout(total=10))
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.http is not None
        await self.http.close()

    async def health(self) -> dict[str, Any]:
        assert self.http is not None
        async with self.http.get(self.base + "/healthz") as resp:
            resp.raise_for_status()
            return await resp.json()

    async def metrics(self) -> str:
        assert self.http is not None
        async with self.http.get(self.base + "/metrics") as resp:
            return await resp.text()

    def rss(self) -> tuple[int, int] | None:
        return rss_bytes(self.pid) if self.pid is not None else None

    def cpu(self) -> float | None:
        return cpu_seconds(self.pid) if self.pid is not None else None


# -- the edges -----------------------------------------------------------------------------------------------------


def alternating() -> Any:
    """Exit every other token: the exited ones go up as eager uploads, the others are escalations."""
    flips = itertools.cycle([1.0, 0.0])
    return lambda logits, hidden: next(flips)


@torch.inference_mode()
def wrong_cloud_tokens(model: Any, prompt: list[int], tokens: list[int], sources: list[str]) -> tuple[list[int], int]:
    """Teacher-forced over prompt + tokens: the indices of the tokens the cloud decided that are not the full model's
    greedy choice given everything before them, and how many cloud tokens were checked. Near-ties (a logit margin
    under NEAR_TIE) count neither way."""
    logits = model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1 :].float()
    top2 = logits.topk(2, dim=-1).values
    margins = (top2[:, 0] - top2[:, 1]).numpy()
    choices = logits.argmax(-1).numpy()
    cloud = [i for i, s in enumerate(sources) if s == CLOUD and margins[i] > NEAR_TIE]
    return [i for i in cloud if tokens[i] != int(choices[i])], len(cloud)


async def _session(index: int, config: LoadConfig, model: Any, report: LoadReport, deadline: float) -> None:
    """One edge device: its own runtime and link; requests back to back until the deadline."""
    rng = np.random.default_rng(config.seed + index)
    manifest = edge_identity(model, config.exit_layer)
    link = WebSocketCloudLink(config.url, codec=config.codec, manifest=manifest, token=config.token, timeout_s=config.timeout_s,
                              client_name=f"load-{index}")
    runtime = TorchEdgeRuntime(EdgePart(model, config.exit_layer), manifest)
    decoder = CollaborativeDecoder(runtime, link, model.config.num_hidden_layers, confidence=alternating())
    options = DecodeOptions(config.max_new_tokens, threshold=0.5, catch_up="eager", lossless=False, max_draft=1)
    vocab = int(model.config.vocab_size)
    try:
        for n in itertools.count():
            if time.monotonic() >= deadline:
                break
            prompt = [int(t) for t in rng.integers(0, vocab, config.prompt_tokens)]
            tokens, sources = [], []
            try:
                async for event in decoder.stream(prompt, options):
                    tokens.append(event.token_id)
                    sources.append(event.source)
            except Exception as exc:  # noqa: BLE001 - the driver counts every failure, whatever its kind
                report.failed_requests += 1
                _note(report, f"session {index} request {n}: {type(exc).__name__}: {exc}")
                continue
            report.requests += 1
            report.tokens += len(tokens)
            report.cloud_tokens += sources.count(CLOUD)
            report.edge_tokens += sources.count(EDGE)
            report.fallback_tokens += sources.count(FALLBACK)
            if FALLBACK in sources:
                _note(report, f"session {index} request {n}: {sources.count(FALLBACK)} fallback tokens ({link.last_error})")
            if config.verify_every and n % config.verify_every == 0:
                wrong, checked = wrong_cloud_tokens(model, prompt, tokens, sources)
                report.wrong_tokens += len(wrong)
                report.verified_tokens += checked
                if wrong:
                    _note(report, f"session {index} request {n}: cloud tokens at {wrong[:5]} are not the full model's")
    finally:
        await link.aclose()


def _note(report: LoadReport, message: str) -> None:
    if len(report.first_errors) < 10:
        report.first_errors.append(message)


async def _sample(probe: CloudProbe, report: LoadReport, warm_at: float, stop: asyncio.Event, every_s: float) -> None:
    while not stop.is_set():
        rss = probe.rss()
        if rss is not None and report.rss_warm is None and time.monotonic() >= warm_at:
            report.rss_warm = rss[0]
        try:
            health = await probe.health()
            report.kv_bytes_max = max(report.kv_bytes_max, int(health["kv_bytes"]))
        except (aiohttp.ClientError, asyncio.TimeoutError, KeyError, ValueError) as exc:
            report.health_failures += 1
            _note(report, f"health probe: {type(exc).__name__}: {exc}")
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except asyncio.TimeoutError:
            pass


async def run_load(config: LoadConfig, model: Any, server_pid: int | None = None) -> LoadReport:
    """Drive `config.sessions` edges against the cloud at `config.url` for `config.duration_s` seconds.

    `model` is the cloud's model (same weights: the link's hello checks the fingerprint); `server_pid`, when the
    cloud runs on this machine, lets its RSS be sampled.
    """
    report = LoadReport(config.sessions)
    async with CloudProbe(config.url, server_pid, config.token) as probe:
        health = await probe.health()
        report.kv_budget_bytes = health.get("kv_budget_bytes")
        before = await probe.metrics()
        rss = probe.rss()
        report.rss_start = rss[0] if rss else None
        cpu_before = probe.cpu()
        started = time.monotonic()
        stop = asyncio.Event()
        sampler = asyncio.create_task(_sample(probe, report, started + config.warmup_s, stop, config.sample_s))
        deadline = started + config.duration_s
        await asyncio.gather(*(_session(i, config, model, report, deadline) for i in range(config.sessions)))
        report.duration_s = time.monotonic() - started
        stop.set()
        await sampler
        rss, cpu_after = probe.rss(), probe.cpu()
        if cpu_before is not None and cpu_after is not None:
            report.cloud_cpu_s = cpu_after - cpu_before
        if rss is not None:
            report.rss_end, report.rss_peak = rss
            report.rss_warm = report.rss_warm if report.rss_warm is not None else report.rss_start
        after = await probe.metrics()
        report.cloud_errors = counter_delta(before, after, "offramp_cloud_errors_total")
        report.evictions = sum(counter_delta(before, after, "offramp_cloud_evictions_total").values())
        report.cloud_escalations = sum(counter_delta(before, after, "offramp_cloud_escalations_total").values())
        report.cloud_uploads = sum(counter_delta(before, after, "offramp_cloud_uploads_total").values())
        report.sessions_left = int((await probe.health())["sessions"])
    return report
