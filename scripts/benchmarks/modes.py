"""The pieces of `offramp bench compare`: prompts, agreement, one request in each mode, aggregation.

Each mode turns one prompt (token ids) into a `RequestResult`: the tokens, when the first one came, how long
the whole request took, what the cloud did for it and what crossed the link. `aggregate` turns a list of them
into one row of the report. The network and the cloud processes are `offramp.bench.processes`'s business; this module
takes a `CloudLink` or a completions URL and does not care what is behind it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from offramp.edge.decode_loop import DecodeOptions
from offramp.edge.link import CloudLink
from offramp.edge.runtime import EdgeRuntime
from offramp.shared.codecs import get_codec

# --------------------------------------------------------------------------------------------------- prompts

# Used only when the exit-head engineer's corpus module (models/corpus.py, held-out "test" split) is absent.
FALLBACK_PROMPTS: tuple[tuple[str, str], ...] = (
    ("chat", "What is photosynthesis?"),
    ("chat", "Can you explain black holes in simple terms?"),
    ("chat", "Why is sleep important?"),
    ("chat", "Give me three interesting facts about bees."),
    ("chat", "How would you describe the internet to a ten-year-old?"),
    ("chat", "What are the main advantages and disadvantages of electric cars?"),
    ("chat", "Write a short paragraph about the Moon."),
    ("chat", "What is inflation?"),
    ("chat", "Can you explain vaccines in simple terms?"),
    ("chat", "Write a short story that involves a lighthouse."),
    ("plain", "The history of the printing press is"),
    ("plain", "Here is a short introduction to plate tectonics."),
    ("plain", "Many people do not know that honey"),
    ("plain", "The history of jazz music is"),
    ("plain", "Here is a short introduction to the periodic table."),
    ("plain", "Many people do not know that penguins"),
    ("plain", "The history of bicycles is"),
    ("plain", "Here is a short introduction to glaciers."),
    ("plain", "Many people do not know that tea"),
    ("plain", "The history of the Olympic Games is"),
)


@dataclass(frozen=True)
class BenchPrompt:
    prompt_id: str
    source: str  # chat | plain
    text: str
    input_ids: tuple[int, ...]


def held_out_prompts(tokenizer, count: int) -> tuple[list[BenchPrompt], str]:
    """Half chat, half plain, from the exit-head corpus's held-out test split when it exists; else a fixed list.

    Returns the prompts and where they came from, so the report can say whether exit heads saw them.
    """
    try:
        from offramp.models.corpus import builtin_prompts, encode_prompt, split_of

        pool = [(doc_id, source, text) for doc_id, source, text in builtin_prompts() if split_of(doc_id) == "test"]
        origin = "models.corpus held-out test split"
    except (ImportError, AttributeError):
        pool, origin = [(f"fixed:{i}", s, t) for i, (s, t) in enumerate(FALLBACK_PROMPTS)], "bench fixed list"
        encode_prompt = None
    by_source = {s: [p for p in pool if p[1] == s] for s in ("chat", "plain")}
    picked: list[tuple[str, str, str]] = []
    for i in range(count):  # alternate chat / plain, in a fixed order
        source = ("chat", "plain")[i % 2]
        bucket = by_source[source] or by_source[("plain", "chat")[i % 2]]
        if bucket:
            picked.append(bucket.pop(0))
    prompts = []
    for doc_id, source, text in picked:
        if encode_prompt is not None:
            ids = encode_prompt(tokenizer, source, text)
        else:
            if source == "chat":
                ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
                ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            else:
                ids = tokenizer(text, add_special_tokens=True)["input_ids"]
        prompts.append(BenchPrompt(doc_id, source, text, tuple(int(t) for t in ids)))
    return prompts, origin


# --------------------------------------------------------------------------------------------------- agreement


class AgreementJudge:
    """Teacher-forced agreement with the full model, cached by (prompt, output).

    For each emitted token: is it the full model's greedy choice after the same prefix? All-agree means the
    output *is* the full model's greedy output (by induction), so this is the strict per-token form of "same
    answers", and it does not punish one early disagreement 63 times the way a position-by-position diff does.
    """

    def __init__(self, model) -> None:
        self.model = model
        self._cache: dict[tuple[tuple[int, ...], tuple[int, ...]], list[int]] = {}

    @torch.inference_mode()
    def full_predictions(self, prompt: Sequence[int], output: Sequence[int]) -> list[int]:
        key = (tuple(prompt), tuple(output))
        if key not in self._cache:
            ids = torch.tensor([list(prompt) + list(output)])
            logits = self.model(input_ids=ids).logits[0]
            start = len(prompt) - 1
            self._cache[key] = logits[start : start + len(output)].argmax(-1).tolist()
        return self._cache[key]

    def agreement(self, prompt: Sequence[int], output: Sequence[int]) -> tuple[int, int]:
        """(agreeing tokens, tokens)."""
        if not output:
            return 0, 0
        preds = self.full_predictions(prompt, output)
        return sum(int(a == b) for a, b in zip(preds, output)), len(output)


# --------------------------------------------------------------------------------------------------- settings

LOOPS = ("exit", "exit-eager", "lossless")  # decode-loop variants a setting can run (offramp.edge.decode_loop)


@dataclass(frozen=True)
class Setting:
    """One collaborative configuration: where the model is split, when the edge exits, how states are encoded,
    and how the decode loop runs (`DecodeOptions`: lossless or exit mode, catch-up, speculation depth)."""

    exit_layer: int
    threshold: float
    codec: str
    edge_precision: str
    catch_up: str = "lazy"
    lossless: bool = False
    max_draft: int = 16  # drafts ahead of the last final token, at most (the controller adapts below it)
    fixed_draft: int = 0  # > 0: speculate exactly this deep (no controller)

    @classmethod
    def with_loop(cls, loop: str, exit_layer: int, threshold: float, codec: str, edge_precision: str,
                  max_draft: int = 16, fixed_draft: int = 0) -> "Setting":
        """A setting from a loop name in `LOOPS`."""
        if loop not in LOOPS:
            raise ValueError(f"unknown decode loop {loop!r}; known: {LOOPS}")
        return cls(exit_layer, threshold, codec, edge_precision, catch_up="eager" if loop == "exit-eager" else "lazy",
                   lossless=loop == "lossless", max_draft=max_draft, fixed_draft=fixed_draft)

    @property
    def loop(self) -> str:
        """exit | exit-eager | lossless<max> | lossless-fixed<N> (with -fixed<N> on exit loops too): one word."""
        base = ("lossless" if self.lossless else "exit-eager" if self.catch_up == "eager" else "exit")
        if self.fixed_draft:
            return f"{base}-fixed{self.fixed_draft}"
        return f"{base}{self.max_draft}" if self.lossless else base

    @property
    def key(self) -> str:
        return f"K{self.exit_layer}/t{self.threshold:g}/{self.codec}/{self.edge_precision}/{self.loop}"


# --------------------------------------------------------------------------------------------------- one request


@dataclass
class RequestResult:
    prompt_id: str
    token_ids: list[int]
    ttft_s: float
    latency_s: float
    edge_exits: int = 0
    escalations: int = 0
    fallback_tokens: int = 0
    drafted_tokens: int = 0  # drafts the cloud verified
    draft_rollbacks: int = 0  # rejections: each rolled the edge back
    rejected_drafts: int = 0  # drafts the cloud replaced (the first wrong one of a request)
    accepted_drafts: int = 0  # drafts the cloud kept
    cloud_layer_tokens: int = 0
    full_layer_tokens: int = 0
    payload_up: int = 0  # the request's frame bytes, as the link counted them (LinkStats); wire bytes come from the proxy
    payload_down: int = 0
    positions_uploaded: int = 0
    requests_sent: int = 0  # requests the link sent (stale ones included): what frame overhead is paid on
    round_trips: int = 0  # requests the cloud answered with a verification or a decision (GenerationStats)
    agree: int = 0
    exact: bool = False
    error: str | None = None
    cloud_cpu_s: float | None = None  # measured around this request from the cloud process
    wire_up: int | None = None  # bytes through the link emulator during this request
    wire_down: int | None = None
    timeline: dict | None = None  # per-token sources, edge drafts, step and round-trip times (what-if model)

    @property
    def tokens(self) -> int:
        return len(self.token_ids)


class TimedRuntime:
    """Wraps an EdgeRuntime to time each step and keep the exit head's argmax (the edge's draft of each token)."""

    def __init__(self, runtime: EdgeRuntime) -> None:
        self.inner = runtime
        self.step_s: list[float] = []
        self.drafts: list[int] = []

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    @property
    def length(self) -> int:
        return self.inner.length

    def run(self, input_ids: list[int]):
        t = time.perf_counter()
        step = self.inner.run(input_ids)
        self.step_s.append(time.perf_counter() - t)
        self.drafts.append(int(np.argmax(step.logits)))
        return step

    def truncate(self, length: int) -> None:
        self.inner.truncate(length)

    def reset(self) -> None:
        self.inner.reset()
        self.step_s, self.drafts = [], []


class CountingLink:
    """Wraps a CloudLink to count uploaded positions and round trips, and record a replayable trace."""

    def __init__(self, link: CloudLink, record: bool = False) -> None:
        self.inner = link
        self.positions = 0
        self.calls = 0
        self.record = record
        self.trace: list[tuple[float, int, np.ndarray, bool]] = []  # (gap since the previous reply, start, hidden, want_token)
        self.rtt_s: list[float] = []  # duration of each extend call, in order
        self._last = time.perf_counter()

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def mark(self) -> None:
        self._last = time.perf_counter()
        self.trace, self.rtt_s = [], []

    async def open_session(self, session_id: str, stats=None) -> None:
        await self.inner.open_session(session_id, stats=stats)
        self._last = time.perf_counter()

    async def extend(self, request, stats=None):
        gap = time.perf_counter() - self._last
        if self.record:
            self.trace.append((gap, request.start, np.array(request.hidden, copy=True), bool(request.want_token)))
        t = time.perf_counter()
        try:
            return await self.inner.extend(request, stats=stats)
        finally:
            self.positions += len(request.hidden)
            self.calls += 1
            self._last = time.perf_counter()
            self.rtt_s.append(self._last - t)

    async def close_session(self, session_id: str, stats=None) -> None:
        await self.inner.close_session(session_id, stats=stats)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def run_request(service, prompt: BenchPrompt, max_new_tokens: int) -> RequestResult:
    """One generation through the edge service (`offramp.edge.service.EdgeService`, opened with `TimedRuntime` and
    `CountingLink` wrappers), as the daemon and the SDK run it; a service without a cloud is edge-only."""
    from offramp.edge.text_stream import TextRequest

    counting = service.link if isinstance(service.link, CountingLink) else None
    before = (counting.positions, counting.calls, len(counting.rtt_s)) if counting is not None else (0, 0, 0)
    stream = service.generate(TextRequest(list(prompt.input_ids), max_new_tokens))
    started = time.perf_counter()
    done = await stream.collect()
    latency = time.perf_counter() - started
    timed = stream.decoder.runtime
    tokens, sources, s = done.token_ids, done.sources, done.stats
    after = (counting.positions, counting.calls) if counting is not None else (0, 0)
    timeline = {
        "sources": sources,
        "draft_agrees": [int(d == t) for d, t in zip(timed.drafts, tokens)],
        "prefill_s": timed.step_s[0] if timed.step_s else 0.0,
        "step_s": timed.step_s[1:],
        "rtt_s": list(counting.rtt_s[before[2]:]) if counting is not None else [],
    }
    return RequestResult(
        prompt.prompt_id, tokens, s.ttft_s, latency, s.edge_exits, s.escalations, s.fallback_tokens,
        s.drafted_tokens, s.draft_rollbacks, s.rejected_drafts, s.accepted_drafts, s.cloud_layer_tokens,
        s.full_layer_tokens, s.bytes_up, s.bytes_down, after[0] - before[0], after[1] - before[1], s.round_trips,
        timeline=timeline,
    )


def run_cloud_only_inprocess(model, prompt: BenchPrompt, max_new_tokens: int, stop_ids: Sequence[int]) -> RequestResult:
    """The baseline without a network (smoke tests, `--cloud inprocess`)."""
    from offramp.cloud.full_model import FullModelRunner

    runner = FullModelRunner(model)
    started = time.perf_counter()
    tokens, ttft = [], 0.0
    for token in runner.generate_ids(list(prompt.input_ids), max_new_tokens, stop_ids=stop_ids):
        tokens.append(token)
        if len(tokens) == 1:
            ttft = time.perf_counter() - started
    latency = time.perf_counter() - started
    return RequestResult(prompt.prompt_id, tokens, ttft, latency, escalations=len(tokens),
                         cloud_layer_tokens=runner.layer_tokens, full_layer_tokens=runner.layer_tokens)


async def run_cloud_only_http(
    session, url: str, prompt: BenchPrompt, max_new_tokens: int, num_layers: int, timeout_s: float = 120.0
) -> RequestResult:
    """The baseline as a user would deploy it: the prompt goes up, the cloud's full model streams tokens back.

    Sends token ids (OpenAI completions accept a list of ints) so both modes see exactly the same prompt, and
    reads the `token_ids` each streamed choice of `offramp cloud serve` carries, so agreement compares tokens.
    """
    import aiohttp

    body = {"prompt": list(prompt.input_ids), "max_tokens": max_new_tokens, "temperature": 0, "stream": True}
    started = time.perf_counter()
    ttft, tokens = 0.0, []
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    async with session.post(url, json=body, timeout=timeout) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{url}: HTTP {resp.status}: {(await resp.text())[:300]}")
        async for raw in resp.content:
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            ids = [int(t) for c in chunk.get("choices", []) for t in c.get("token_ids", [])]
            if ids and ttft == 0.0:
                ttft = time.perf_counter() - started
            tokens.extend(ids)
    latency = time.perf_counter() - started
    result = RequestResult(prompt.prompt_id, tokens, ttft, latency)
    result.error = None if tokens else "no token ids in the stream"
    positions = len(prompt.input_ids) + max(len(tokens) - 1, 0)
    result.cloud_layer_tokens = result.full_layer_tokens = positions * num_layers
    result.escalations = len(tokens)
    return result


# --------------------------------------------------------------------------------------------------- aggregation


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else float("nan")


@dataclass
class ModeRow:
    """One line of a report table: a mode (and its setting) on one profile, over all prompts."""

    mode: str  # cloud-only | edge-only | collaborative
    profile: str
    exit_layer: int | None = None
    threshold: float | None = None
    codec: str | None = None
    edge_precision: str | None = None
    catch_up: str | None = None  # decode-loop options (collaborative rows)
    lossless: bool | None = None
    max_draft: int | None = None
    fixed_draft: int | None = None
    requests: int = 0
    tokens: int = 0
    latency_p50_s: float = 0.0
    latency_p90_s: float = 0.0
    ttft_p50_s: float = 0.0
    ttft_p90_s: float = 0.0
    tokens_per_s: float = 0.0
    exit_rate: float = 0.0
    escalations: int = 0
    fallback_tokens: int = 0
    drafted_tokens: int = 0
    draft_rollbacks: int = 0
    rejected_drafts: int = 0
    accepted_drafts: int = 0
    agreement: float = 0.0  # teacher-forced, per token
    exact_match: float = 0.0  # share of prompts whose output is the full model's greedy output
    cloud_layer_tokens: int = 0
    full_layer_tokens: int = 0
    cloud_cpu_s: float | None = None
    wire_up: int | None = None  # bytes through the proxy (None without one)
    wire_down: int | None = None
    payload_up: int = 0
    payload_down: int = 0
    positions_uploaded: int = 0
    requests_sent: int = 0
    round_trips: int = 0
    errors: int = 0
    edge_step_p50_s: float | None = None  # one decode step of the edge graph (medians over every request's steps)
    round_trip_p50_s: float | None = None  # one request to the cloud and its answer, as the edge saw it
    # Filled against the same profile's cloud-only row:
    latency_ratio: float | None = None
    cloud_compute_ratio: float | None = None
    cloud_cpu_ratio: float | None = None
    ttft_ratio: float | None = None
    per_request: list[dict] = field(default_factory=list)

    @classmethod
    def of(cls, mode: str, profile: str, setting: Setting | None) -> "ModeRow":
        """An empty row for a mode; collaborative rows carry their whole setting, edge-only its K and precision."""
        if setting is None:
            return cls(mode, profile)
        if mode != "collaborative":
            return cls(mode, profile, setting.exit_layer, edge_precision=setting.edge_precision)
        return cls(mode, profile, setting.exit_layer, setting.threshold, setting.codec, setting.edge_precision,
                   setting.catch_up, setting.lossless, setting.max_draft, setting.fixed_draft)

    def setting(self) -> Setting | None:
        if self.mode != "collaborative":
            return None
        return Setting(self.exit_layer, self.threshold, self.codec, self.edge_precision, self.catch_up or "lazy",
                       bool(self.lossless), self.max_draft or 16, self.fixed_draft or 0)

    @property
    def loop(self) -> str | None:
        setting = self.setting()
        return setting.loop if setting is not None else None

    @property
    def key(self) -> str:
        if self.mode == "edge-only" and self.exit_layer is not None:
            return f"edge-only K{self.exit_layer}/{self.edge_precision}"
        setting = self.setting()
        return setting.key if setting is not None else self.mode

    def up_bytes(self) -> int:
        return self.wire_up if self.wire_up is not None else self.payload_up

    def down_bytes(self) -> int:
        return self.wire_down if self.wire_down is not None else self.payload_down

    @property
    def bytes_up_per_token(self) -> float:
        return self.up_bytes() / max(self.tokens, 1)

    @property
    def bytes_down_per_token(self) -> float:
        return self.down_bytes() / max(self.tokens, 1)

    @property
    def tokens_per_round_trip(self) -> float | None:
        """Tokens emitted per request the cloud answered (cloud-only streams without round trips: None)."""
        return self.tokens / self.round_trips if self.round_trips else None

    @property
    def acceptance_rate(self) -> float | None:
        """Share of checked drafts the cloud kept: the per-draft acceptance. Drafts after a request's first wrong one
        are dropped unchecked, so the denominator is kept + rejected (one rejection a request), not every draft sent."""
        checked = self.accepted_drafts + self.rejected_drafts
        return self.accepted_drafts / checked if checked else None

    @property
    def bytes_up_per_position(self) -> float | None:
        """Upload per hidden state sent (the per-escalated-token cost the issue's target is about)."""
        return self.up_bytes() / self.positions_uploaded if self.positions_uploaded else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(key=self.key, loop=self.loop, bytes_up_per_token=self.bytes_up_per_token, bytes_down_per_token=self.bytes_down_per_token,
                 bytes_up_per_position=self.bytes_up_per_position, tokens_per_round_trip=self.tokens_per_round_trip,
                 acceptance_rate=self.acceptance_rate)
        return d


def aggregate(row: ModeRow, results: Sequence[RequestResult], wall_s: float) -> ModeRow:
    """Fill a row from its requests (run one after another, so tokens/s is per request stream)."""
    ok = [r for r in results if r.error is None]
    row.requests, row.errors = len(results), len(results) - len(ok)
    row.tokens = sum(r.tokens for r in ok)
    lat, ttft = [r.latency_s for r in ok], [r.ttft_s for r in ok]
    row.latency_p50_s, row.latency_p90_s = percentile(lat, 50), percentile(lat, 90)
    row.ttft_p50_s, row.ttft_p90_s = percentile(ttft, 50), percentile(ttft, 90)
    row.tokens_per_s = row.tokens / max(sum(lat), 1e-9)
    row.exit_rate = sum(r.edge_exits for r in ok) / max(row.tokens, 1)
    row.escalations = sum(r.escalations for r in ok)
    row.fallback_tokens = sum(r.fallback_tokens for r in ok)
    row.drafted_tokens = sum(r.drafted_tokens for r in ok)
    row.draft_rollbacks = sum(r.draft_rollbacks for r in ok)
    row.rejected_drafts = sum(r.rejected_drafts for r in ok)
    row.accepted_drafts = sum(r.accepted_drafts for r in ok)
    row.agreement = sum(r.agree for r in ok) / max(row.tokens, 1)
    row.exact_match = sum(r.exact for r in ok) / max(len(ok), 1)
    row.cloud_layer_tokens = sum(r.cloud_layer_tokens for r in ok)
    row.full_layer_tokens = sum(r.full_layer_tokens for r in ok)
    row.payload_up = sum(r.payload_up for r in ok)
    row.payload_down = sum(r.payload_down for r in ok)
    row.positions_uploaded = sum(r.positions_uploaded for r in ok)
    steps = [t for r in ok if r.timeline for t in r.timeline["step_s"]]
    trips = [t for r in ok if r.timeline for t in r.timeline["rtt_s"]]
    row.edge_step_p50_s = percentile(steps, 50) if steps else None
    row.round_trip_p50_s = percentile(trips, 50) if trips else None
    row.requests_sent = sum(r.requests_sent for r in ok)
    row.round_trips = sum(r.round_trips for r in ok)
    if ok and all(r.cloud_cpu_s is not None for r in ok):
        row.cloud_cpu_s = sum(r.cloud_cpu_s for r in ok)
    if ok and all(r.wire_up is not None for r in ok):
        row.wire_up, row.wire_down = sum(r.wire_up for r in ok), sum(r.wire_down for r in ok)
    row.per_request = [
        {k: v for k, v in asdict(r).items() if k not in ("token_ids", "timeline")} | {"tokens": r.tokens} for r in results
    ]
    return row


def compare_to_baseline(rows: Sequence[ModeRow]) -> None:
    """Ratios of every row against the cloud-only row of the same profile.

    Cloud work is compared per generated token (both sides' totals over the same prompts, divided by the tokens
    each produced), so a mode that stops earlier on some prompt is not credited with the work it did not do.
    Layer-tokens count every position the cloud ran, prompt catch-up and re-uploads after a rollback included;
    cloud CPU seconds are the server process's own (utime + stime), measured around each request.
    """
    base = {r.profile: r for r in rows if r.mode == "cloud-only"}
    for row in rows:
        b = base.get(row.profile)
        if b is None or row.tokens == 0 or b.tokens == 0:
            continue
        if b.latency_p50_s > 0:
            row.latency_ratio = row.latency_p50_s / b.latency_p50_s
        if b.cloud_layer_tokens > 0:
            row.cloud_compute_ratio = (row.cloud_layer_tokens / row.tokens) / (b.cloud_layer_tokens / b.tokens)
        if row.cloud_cpu_s is not None and b.cloud_cpu_s:
            row.cloud_cpu_ratio = (row.cloud_cpu_s / row.tokens) / (b.cloud_cpu_s / b.tokens)
        if b.ttft_p50_s > 0:
            row.ttft_ratio = row.ttft_p50_s / b.ttft_p50_s


def best_setting(rows: Sequence[ModeRow], profile: str, min_agreement: float = 0.98) -> ModeRow | None:
    """The collaborative setting with the lowest latency among those at >= min_agreement on `profile`."""
    ok = [r for r in rows if r.profile == profile and r.mode == "collaborative" and r.agreement >= min_agreement
          and r.latency_ratio is not None and r.errors == 0]
    return min(ok, key=lambda r: (r.latency_ratio, r.cloud_compute_ratio or 1.0)) if ok else None


def followup_settings(grid_rows: Sequence[ModeRow], top: int) -> list[Setting]:
    """The settings the other profiles re-run: the fastest at >= 98% agreement of each decode loop (so every loop
    is compared on every profile), then the fastest faithful ones overall, then the most faithful; `top` in all."""
    collab = [r for r in grid_rows if r.mode == "collaborative" and r.errors == 0]
    good = sorted((r for r in collab if r.agreement >= 0.98), key=lambda r: r.latency_p50_s)
    rest = sorted((r for r in collab if r.agreement < 0.98), key=lambda r: (-r.agreement, r.latency_p50_s))
    per_loop = list({_loop_kind(r): r for r in reversed(good)}.values())[::-1]
    picked = list(dict.fromkeys(r.setting() for r in per_loop + good + rest))
    return picked[:top]


def _loop_kind(row: ModeRow) -> str:
    """The loop without its numbers (draft8 and draft4 are one kind)."""
    return "".join(c for c in row.loop or "" if not c.isdigit())


def summary_of(row: ModeRow | None, hidden_size: int) -> dict:
    if row is None:
        return {"threshold": None, "exit_layer": None, "codec": None, "agreement": None, "latency_ratio": None,
                "cloud_compute_ratio": None, "bytes_up_per_token": None, "note": "no collaborative setting reached 98% agreement"}
    codec_bytes = get_codec(row.codec).nbytes(1, hidden_size)  # the hidden state itself; the rest is framing
    return {
        "threshold": row.threshold,
        "exit_layer": row.exit_layer,
        "codec": row.codec,
        "edge_precision": row.edge_precision,
        "loop": row.loop,
        "catch_up": row.catch_up,
        "fixed_draft": row.fixed_draft,
        "lossless": row.lossless,
        "max_draft": row.max_draft,
        "agreement": row.agreement,
        "exact_match": row.exact_match,
        "latency_ratio": row.latency_ratio,
        "cloud_compute_ratio": row.cloud_compute_ratio,
        "cloud_cpu_ratio": row.cloud_cpu_ratio,
        "bytes_up_per_token": row.bytes_up_per_token,
        "bytes_up_per_position": row.bytes_up_per_position,
        "codec_bytes_per_position": codec_bytes,
        "frame_bytes_per_round_trip": (row.payload_up - codec_bytes * row.positions_uploaded) / row.requests_sent if row.requests_sent else None,
        "hidden_size": hidden_size,
        "exit_rate": row.exit_rate,
        "latency_p50_s": row.latency_p50_s,
        "ttft_p50_s": row.ttft_p50_s,
    }



HEADLINE_KEYS = ("exit_layer", "latency_ratio", "ttft_ratio", "agreement", "tokens_per_round_trip",
                 "cloud_compute_ratio", "bytes_up_per_token")


def headline_of(row: ModeRow) -> dict:
    """A headline row: the issue's keys (`HEADLINE_KEYS`), then what else a reader needs to trust them."""
    return {
        **{key: getattr(row, key) for key in HEADLINE_KEYS},
        "setting": row.key,
        "loop": row.loop,
        "codec": row.codec,
        "edge_precision": row.edge_precision,
        "acceptance_rate": row.acceptance_rate,
        "exact_match": row.exact_match,
        "exit_rate": row.exit_rate,
        "fallback_tokens": row.fallback_tokens,
        "latency_p50_s": row.latency_p50_s,
        "ttft_p50_s": row.ttft_p50_s,
        "cloud_cpu_ratio": row.cloud_cpu_ratio,
        "errors": row.errors,
    }
