"""The collaborative decode loop: confident tokens exit at the edge, the rest are escalated to the cloud.

It knows token ids only (no text, no transport). The edge keeps every position's layer-K hidden state, so it
can (re-)upload any suffix the cloud lacks: exited tokens are caught up lazily with the next escalation, an
evicted or restarted cloud is rebuilt from the edge, and an unreachable cloud means edge-fallback tokens,
never a failed request.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor
from dataclasses import asdict, dataclass, field

import numpy as np

from offramp.cloud.engine import ContextMismatchError
from offramp.edge.link import CloudLink, CloudUnavailableError
from offramp.edge.runtime import EdgeRuntime, EdgeStep
from offramp.shared.sampling import SamplingParams, pick_token, softmax

EDGE, CLOUD, FALLBACK = "edge", "cloud", "edge-fallback"
CATCH_UP_MODES = ("lazy", "eager")

Confidence = Callable[[np.ndarray, np.ndarray], float]


def max_prob_confidence(logits: np.ndarray, hidden: np.ndarray) -> float:
    """The uncalibrated default: the exit head's max softmax probability."""
    return float(softmax(logits).max())


@dataclass
class GenerationStats:
    tokens: int = 0
    edge_exits: int = 0
    escalations: int = 0
    fallback_tokens: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    cloud_layer_tokens: int = 0  # deep-layer evaluations the cloud did for this request
    full_layer_tokens: int = 0  # what running every layer in the cloud would have cost
    ttft_s: float = 0.0
    wall_s: float = 0.0
    checked_exits: int = 0  # exited tokens whose full-model prediction came back from a catch-up
    agreed_exits: int = 0  # ... and agreed with the edge

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TokenEvent:
    token_id: int
    source: str
    position: int  # position of this token in the sequence (prompt positions come first)


@dataclass
class DecodeOptions:
    max_new_tokens: int = 64
    threshold: float = 0.9  # exit when confidence >= threshold; > 1 never exits
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop_ids: Sequence[int] = ()
    catch_up: str = "lazy"  # lazy: exited tokens' states go up with the next escalation; eager: right away, in the background

    def __post_init__(self) -> None:
        if self.catch_up not in CATCH_UP_MODES:
            raise ValueError(f"catch_up must be one of {CATCH_UP_MODES}, got {self.catch_up!r}")


class CollaborativeDecoder:
    """Drives one edge runtime and an optional cloud link through one generation at a time."""

    def __init__(
        self,
        runtime: EdgeRuntime,
        link: CloudLink | None,
        total_layers: int,
        confidence: Confidence = max_prob_confidence,
        executor: Executor | None = None,
    ) -> None:
        self.runtime = runtime
        self.link = link
        self.total_layers = total_layers
        self.confidence = confidence
        self.executor = executor  # where edge steps run; None = inline (a server passes a pool so its loop stays free)
        self.stats = GenerationStats()
        self._uploads: list[asyncio.Task] = []

    @property
    def mode(self) -> str:
        return "collaborative" if self.link is not None else "edge-standalone"

    async def stream(self, prompt_ids: Sequence[int], options: DecodeOptions) -> AsyncIterator[TokenEvent]:
        """Yield tokens as they are decided; `self.stats` is complete when the iterator ends."""
        if not prompt_ids:
            raise ValueError("the prompt must contain at least one token")
        self.stats = stats = GenerationStats()
        started = time.perf_counter()
        rng = np.random.default_rng(options.seed)
        session = uuid.uuid4().hex
        self.runtime.reset()
        hidden_log: list[np.ndarray] = []  # layer-K states of every position, the cloud's context source
        emitted: dict[int, int] = {}  # position -> token the edge decided there (for online agreement)
        synced = 0  # positions the cloud holds
        link_up = self.link is not None
        link_before = _link_counters(self.link)
        if self.link is not None:
            try:
                await self.link.open_session(session)
            except CloudUnavailableError:
                link_up = False

        step = await self._run(list(prompt_ids))
        hidden_log.extend(step.hidden)
        try:
            for _ in range(options.max_new_tokens):
                position = self.runtime.length  # the new token's position
                u = float(rng.random())
                token, source = None, EDGE
                confident = self.confidence(step.logits, step.hidden[-1]) >= options.threshold
                if not confident and self.link is not None:
                    try:
                        token, synced = await self._escalate(session, hidden_log, synced, emitted, options, u)
                        source, link_up = CLOUD, True
                    except CloudUnavailableError:
                        source, link_up = FALLBACK, False
                if token is None:
                    token = pick_token(step.logits, options.sampling, u)
                stats.tokens += 1
                stats.edge_exits += source == EDGE
                stats.escalations += source == CLOUD
                stats.fallback_tokens += source == FALLBACK
                if stats.tokens == 1:
                    stats.ttft_s = time.perf_counter() - started
                if source != CLOUD:
                    emitted[position] = token
                if source == EDGE and options.catch_up == "eager" and link_up and synced < len(hidden_log):
                    synced = await self._upload_in_background(session, hidden_log, synced, emitted)
                yield TokenEvent(token, source, position)
                if token in options.stop_ids or self.runtime.length >= self.runtime.max_positions:
                    break
                if stats.tokens < options.max_new_tokens:
                    step = await self._run([token])
                    hidden_log.append(step.hidden[-1])
        finally:
            if self._uploads:
                await asyncio.gather(*self._uploads, return_exceptions=True)
                self._uploads.clear()
            if self.link is not None and link_up:
                try:
                    await self.link.close_session(session)
                except CloudUnavailableError:
                    pass
            positions = len(prompt_ids) + max(stats.tokens - 1, 0)
            stats.full_layer_tokens = positions * self.total_layers
            link_after = _link_counters(self.link)
            stats.bytes_up = link_after[0] - link_before[0]
            stats.bytes_down = link_after[1] - link_before[1]
            stats.wall_s = time.perf_counter() - started

    async def _run(self, input_ids: list[int]) -> EdgeStep:
        if self.executor is None:
            return self.runtime.run(input_ids)
        return await asyncio.get_running_loop().run_in_executor(self.executor, self.runtime.run, input_ids)

    async def _escalate(
        self,
        session: str,
        hidden_log: list[np.ndarray],
        synced: int,
        emitted: dict[int, int],
        options: DecodeOptions,
        u: float,
    ) -> tuple[int, int]:
        """Upload everything the cloud lacks and take its token; re-upload from what it holds if it lost some."""
        assert self.link is not None
        for _ in range(3):
            chunk = np.stack(hidden_log[synced:])
            try:
                result = await self.link.extend(session, synced, chunk, True, options.sampling, u)
            except ContextMismatchError as exc:  # evicted or restarted cloud: rebuild from our copy
                synced = exc.have
                continue
            self.stats.cloud_layer_tokens += len(chunk) * self.link.deep_layers
            self._check_agreement(result.start, result.predicted[:-1], emitted)  # the last one is the escalated token
            return int(result.token), result.length
        raise CloudUnavailableError(f"session {session}: the cloud kept losing its context")

    async def _upload_in_background(self, session: str, hidden_log: list[np.ndarray], synced: int, emitted: dict[int, int]) -> int:
        """Eager catch-up: send the states the cloud lacks now, without waiting for the answer.

        The link keeps a session's frames in order, so the next escalation may assume they arrived; if one was
        lost, the cloud answers that escalation with what it holds and the loop re-uploads from there.
        """
        assert self.link is not None
        chunk = np.stack(hidden_log[synced:])
        task = asyncio.ensure_future(self._upload(session, synced, chunk, emitted))
        self._uploads = [t for t in self._uploads if not t.done()] + [task]
        await asyncio.sleep(0)  # let the upload's frame go out before anything later in this session
        return synced + len(chunk)

    async def _upload(self, session: str, start: int, chunk: np.ndarray, emitted: dict[int, int]) -> None:
        assert self.link is not None
        try:
            result = await self.link.extend(session, start, chunk, False, SamplingParams(), 0.0)
        except (CloudUnavailableError, ContextMismatchError):
            return  # the next escalation learns what the cloud holds and re-uploads
        self.stats.cloud_layer_tokens += len(chunk) * self.link.deep_layers
        self._check_agreement(result.start, result.predicted, emitted)

    def _check_agreement(self, start: int, predicted: list[int], emitted: dict[int, int]) -> None:
        """The catch-up pass predicts every exited position's next token: count how often the edge agreed."""
        for offset, token in enumerate(predicted):
            edge_token = emitted.get(start + offset + 1)
            if edge_token is not None:
                self.stats.checked_exits += 1
                self.stats.agreed_exits += edge_token == token


def _link_counters(link: CloudLink | None) -> tuple[int, int]:
    if link is None:
        return (0, 0)
    return (link.stats.bytes_up, link.stats.bytes_down)
