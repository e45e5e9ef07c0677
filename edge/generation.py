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

from offramp.edge.link import CloudLink, CloudUnavailableError
from offramp.edge.runtime import EdgeRuntime, EdgeStep
from offramp.shared.contract import ContextMismatchError, DeepResult
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
    drafted_tokens: int = 0  # edge tokens decoded while an escalation was in flight, and kept
    draft_rollbacks: int = 0  # escalations whose answer differed from the edge's guess (drafts thrown away)
    rejected_drafts: int = 0  # lossless: edge drafts the full model disagreed with (or that followed one)

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
    draft_ahead: int = 0  # > 0: while an escalation is in flight, the edge decodes up to this many tokens ahead on its guess
    lossless: bool = False  # greedy only: no edge token is emitted before the cloud confirmed it (speculative decoding)
    max_draft: int = 8  # lossless: edge tokens verified per round trip at most

    def __post_init__(self) -> None:
        if self.lossless and self.max_draft < 1:
            raise ValueError(f"max_draft must be >= 1, got {self.max_draft}")
        if self.catch_up not in CATCH_UP_MODES:
            raise ValueError(f"catch_up must be one of {CATCH_UP_MODES}, got {self.catch_up!r}")


@dataclass
class _Generation:
    """One generation's bookkeeping, shared by the loop's strategies (plain, drafting, lossless, uploads)."""

    session: str
    options: DecodeOptions
    hidden_log: list[np.ndarray] = field(default_factory=list)  # layer-K states of every position: the cloud's context source
    emitted: dict[int, int] = field(default_factory=dict)  # position -> token the edge decided there (online agreement)
    synced: int = 0  # positions the cloud holds
    link_up: bool = False

    def roll_back(self, keep: int) -> None:
        """Forget positions from `keep` on (the edge runtime is truncated by the caller)."""
        del self.hidden_log[keep:]
        self.synced = min(self.synced, keep)


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
        self._last_result: DeepResult | None = None

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
        gen = _Generation(uuid.uuid4().hex, options, link_up=self.link is not None)
        self.runtime.reset()
        link_before = _link_counters(self.link)
        if self.link is not None:
            try:
                await self.link.open_session(gen.session)
            except CloudUnavailableError:
                gen.link_up = False

        step = await self._run(list(prompt_ids))
        gen.hidden_log.extend(step.hidden)
        draws = rng.random(options.max_new_tokens)  # one uniform per generated token, whichever side picks it
        try:
            while stats.tokens < options.max_new_tokens:
                position = self.runtime.length  # the new token's position
                u = float(draws[stats.tokens])
                next_step: EdgeStep | None = None  # set when the edge already ran the last emitted token
                confident = self.confidence(step.logits, step.hidden[-1]) >= options.threshold
                if options.lossless and options.sampling.greedy and self.link is not None:
                    emits = await self._lossless_round(gen, step, position)
                elif confident or self.link is None:
                    emits = [(pick_token(step.logits, options.sampling, u), EDGE)]
                elif options.draft_ahead > 0:
                    emits, next_step = await self._escalate_drafting(gen, draws, step, position)
                else:
                    try:
                        emits, gen.link_up = [(await self._escalate(gen, u, position), CLOUD)], True
                    except CloudUnavailableError:
                        emits, gen.link_up = [(pick_token(step.logits, options.sampling, u), FALLBACK)], False
                stop = False
                for offset, (token, source) in enumerate(emits):
                    stats.tokens += 1
                    stats.edge_exits += source == EDGE
                    stats.escalations += source == CLOUD
                    stats.fallback_tokens += source == FALLBACK
                    if stats.tokens == 1:
                        stats.ttft_s = time.perf_counter() - started
                    if source != CLOUD:
                        gen.emitted[position + offset] = token
                    yield TokenEvent(token, source, position + offset)
                    if token in options.stop_ids or position + offset >= self.runtime.max_positions:
                        stop = True
                        break
                if stop or stats.tokens >= options.max_new_tokens:
                    break
                upto = len(gen.hidden_log) - (next_step is not None)  # keep the newest row back for the next escalation
                if options.catch_up == "eager" and gen.link_up and gen.synced < upto and any(src == EDGE for _, src in emits):
                    await self._upload_in_background(gen, upto)
                if next_step is None:
                    next_step = await self._run([emits[-1][0]])
                    gen.hidden_log.append(next_step.hidden[-1])
                step = next_step
        finally:
            if self._uploads:
                await asyncio.gather(*self._uploads, return_exceptions=True)
                self._uploads.clear()
            if self.link is not None and gen.link_up:
                try:
                    await self.link.close_session(gen.session)
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

    async def _escalate(self, gen: _Generation, u: float, upto: int) -> int:
        """Upload rows synced..upto-1 and take the cloud's token for position upto; re-upload from what it holds if it lost some."""
        assert self.link is not None
        for _ in range(3):
            chunk = np.stack(gen.hidden_log[gen.synced:upto])
            try:
                result = await self.link.extend(gen.session, gen.synced, chunk, True, gen.options.sampling, u)
            except ContextMismatchError as exc:  # evicted or restarted cloud: rebuild from our copy
                gen.synced = exc.have
                continue
            self.stats.cloud_layer_tokens += len(chunk) * self.link.deep_layers
            self._check_agreement(result.start, result.predicted[:-1], gen.emitted)  # the last one is the escalated token
            self._last_result = result
            gen.synced = result.length
            return int(result.token)
        raise CloudUnavailableError(f"session {gen.session}: the cloud kept losing its context")

    async def _escalate_drafting(
        self, gen: _Generation, draws: np.ndarray, step: EdgeStep, position: int
    ) -> tuple[list[tuple[int, str]], EdgeStep | None]:
        """Escalate, and while the answer is on its way keep decoding at the edge on the edge's own guess.

        If the cloud's token equals the guess, the drafted tokens are exactly what the plain loop would have
        produced next (same state, same exit decisions), so they are emitted without waiting again; if not, the
        edge rolls back to the escalated position. Drafting stops at the first position that would escalate.
        Returns the tokens to emit and the edge step after the last of them if it was run.
        """
        options, hidden_log = gen.options, gen.hidden_log
        first = self.stats.tokens
        u = float(draws[first])
        task = asyncio.ensure_future(self._escalate(gen, u, position))
        await asyncio.sleep(0)  # the escalation's frame goes out before the edge gets busy
        drafts = [pick_token(step.logits, options.sampling, u)]
        steps: list[EdgeStep] = []
        left = options.max_new_tokens - first
        while (
            not task.done()
            and len(steps) < options.draft_ahead
            and len(drafts) < left
            and drafts[-1] not in options.stop_ids
            and position + len(steps) < self.runtime.max_positions
        ):
            drafted = await self._run([drafts[-1]])
            hidden_log.append(drafted.hidden[-1])
            steps.append(drafted)
            if self.confidence(drafted.logits, drafted.hidden[-1]) < options.threshold:
                break
            drafts.append(pick_token(drafted.logits, options.sampling, float(draws[first + len(drafts)])))
        try:
            token = await task
            source, gen.link_up = CLOUD, True
        except CloudUnavailableError:
            token, source, gen.link_up = drafts[0], FALLBACK, False
        if token != drafts[0]:
            self.stats.draft_rollbacks += 1
            if self.runtime.length > position:
                self.runtime.truncate(position)
            del hidden_log[position:]
            return [(token, source)], None
        self.stats.drafted_tokens += len(drafts) - 1
        emits = [(drafts[0], source)] + [(d, EDGE) for d in drafts[1:]]
        return emits, (steps[-1] if len(steps) == len(drafts) else None)

    async def _lossless_round(self, gen: _Generation, step: EdgeStep, position: int) -> list[tuple[int, str]]:
        """Speculative decoding with the edge as the drafter: draft while confident, verify in one round trip.

        The cloud's catch-up pass predicts the full model's token at every uploaded position, so the edge keeps
        its drafts up to the first one the full model would not have chosen, takes the cloud's token there (or
        after the last draft), and rolls back the rest. Greedy output equals the full model's, token for token.
        """
        options, hidden_log = gen.options, gen.hidden_log
        left = options.max_new_tokens - self.stats.tokens
        drafts: list[int] = []
        ran = 0  # drafts the edge has run (the last one may be a stop token, never run)
        current = step
        while (
            len(drafts) < min(options.max_draft, left - 1)
            and position + len(drafts) < self.runtime.max_positions - 1
            and self.confidence(current.logits, current.hidden[-1]) >= options.threshold
        ):
            drafts.append(int(np.argmax(current.logits)))
            if drafts[-1] in options.stop_ids:
                break
            current = await self._run([drafts[-1]])
            hidden_log.append(current.hidden[-1])
            ran += 1
        try:
            token = await self._escalate(gen, 0.0, len(hidden_log))
        except CloudUnavailableError:  # nothing can be verified: the drafts and the edge's next pick, marked
            gen.link_up = False
            emits = [(d, FALLBACK) for d in drafts]
            if ran == len(drafts):
                emits.append((int(np.argmax(current.logits)), FALLBACK))
            return emits
        result = self._last_result
        assert result is not None
        accepted = 0
        for i, draft in enumerate(drafts):
            if result.predicted[position + i - 1 - result.start] != draft:
                break
            accepted += 1
        self.stats.checked_exits += len(drafts[: accepted + 1])
        self.stats.agreed_exits += accepted
        self.stats.rejected_drafts += len(drafts) - accepted
        emits = [(d, EDGE) for d in drafts[:accepted]]
        if accepted < len(drafts):  # the full model disagrees at position + accepted: its token, and roll back after
            emits.append((result.predicted[position + accepted - 1 - result.start], CLOUD))
            keep = position + accepted
            if self.runtime.length > keep:
                self.runtime.truncate(keep)
            gen.roll_back(keep)
        elif ran == len(drafts):
            emits.append((token, CLOUD))
        gen.link_up = True
        return emits

    async def _upload_in_background(self, gen: _Generation, upto: int) -> None:
        """Eager catch-up: send the states the cloud lacks now, without waiting for the answer.

        The link keeps a session's frames in order, so the next escalation may assume they arrived; if one was
        lost, the cloud answers that escalation with what it holds and the loop re-uploads from there.
        """
        assert self.link is not None
        chunk = np.stack(gen.hidden_log[gen.synced:upto])
        task = asyncio.ensure_future(self._upload(gen, gen.synced, chunk))
        self._uploads = [t for t in self._uploads if not t.done()] + [task]
        await asyncio.sleep(0)  # let the upload's frame go out before anything later in this session
        gen.synced += len(chunk)

    async def _upload(self, gen: _Generation, start: int, chunk: np.ndarray) -> None:
        assert self.link is not None
        try:
            result = await self.link.extend(gen.session, start, chunk, False, SamplingParams(), 0.0)
        except (CloudUnavailableError, ContextMismatchError):
            return  # the next escalation learns what the cloud holds and re-uploads
        self.stats.cloud_layer_tokens += len(chunk) * self.link.deep_layers
        self._check_agreement(result.start, result.predicted, gen.emitted)

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
