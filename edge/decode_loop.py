"""The collaborative decode loop: the edge drafts, the cloud verifies, several verifications in flight at once.

It knows token ids only (no text, no transport). The edge keeps every position's layer-K hidden state, so it can
(re-)upload any suffix the cloud lacks.

Every token the edge proposes is a draft. In lossless mode (the default) none is emitted before the cloud has
confirmed it: requests carry the rows the cloud lacks and the drafts those rows predict; the cloud accepts drafts
while they match the full model (greedy) or pass speculative sampling (sampled), replaces the first that does
not, and drops what followed it. Meanwhile the edge keeps drafting on its own guesses and sends the next block
before the previous one is answered; a rejection rolls the edge back to the replaced token, and the blocks it had
pipelined after it are answered `stale` without cloud compute (epochs, see `offramp.shared.contract`).

In exit mode (`lossless=False`) a draft whose calibrated confidence reaches the threshold exits: it is emitted
as soon as everything before it is final, without waiting for the cloud, and its row goes up later as catch-up
(lazily with the next request, or eagerly). The other drafts wait for the cloud as in lossless mode.

How far the edge speculates adapts per generation (`DraftController`): enough drafts to cover a round trip at
the measured edge step time, fewer when the drafts are unlikely to survive. An unreachable cloud means the
pending drafts and what follows are emitted as `edge-fallback` tokens; a refusal (bad token, wrong model) is an
error, not a fallback.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import numpy as np

from offramp.edge.link import CloudLink, CloudUnavailableError
from offramp.edge.runtime import EdgeRuntime, EdgeStep
from offramp.shared.contract import ContextMismatchError, DeepResult, ExtendRequest, StaleRequestError
from offramp.shared.sampling import (
    SamplingParams,
    SparseDistribution,
    draft_distribution,
    draw_draft,
    log_softmax,
    position_uniforms,
    softmax,
)

EDGE, CLOUD, FALLBACK = "edge", "cloud", "edge-fallback"
FULL_MODEL, EXIT_HEAD = "full_model", "exit_head"  # whose log-probs a token reports
CATCH_UP_MODES = ("lazy", "eager")
MAX_RESYNCS = 8  # consecutive re-uploads without progress before the cloud counts as unavailable

Confidence = Callable[[np.ndarray, np.ndarray], float]


def head_logprobs(logits: np.ndarray, token: int, top: int) -> tuple[float, list[tuple[int, float]] | None]:
    """The exit head's log-prob (temperature 1, as the cloud reports the full model's) of `token`, and its `top`
    best alternatives when asked: what an edge-decided token reports under OpenAI's `logprobs`."""
    logp = log_softmax(logits)
    if top <= 0:
        return float(logp[token]), None
    best = np.argpartition(-logp, top - 1)[:top] if top < logp.shape[0] else np.arange(logp.shape[0])
    best = best[np.argsort(-logp[best], kind="stable")]
    return float(logp[token]), [(int(i), float(logp[i])) for i in best]


def max_prob_confidence(logits: np.ndarray, hidden: np.ndarray) -> float:
    """The uncalibrated default: the exit head's max softmax probability."""
    return float(softmax(logits).max())


@dataclass
class GenerationStats:
    tokens: int = 0
    edge_exits: int = 0  # tokens decided at the edge alone (exit mode), not verified
    escalations: int = 0  # tokens the cloud decided or confirmed
    fallback_tokens: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    cloud_layer_tokens: int = 0  # deep-layer evaluations the cloud did for this request (rejected drafts included)
    full_layer_tokens: int = 0  # what running every layer in the cloud would have cost
    ttft_s: float = 0.0
    wall_s: float = 0.0
    checked_exits: int = 0  # exited tokens whose full-model prediction came back from a catch-up
    agreed_exits: int = 0  # ... and agreed with the edge
    drafted_tokens: int = 0  # drafts the cloud verified
    accepted_drafts: int = 0  # ... and kept
    rejected_drafts: int = 0  # ... and replaced (the first wrong one of a request; the rows after it were dropped)
    draft_rollbacks: int = 0  # rejections: each rolled the edge back
    round_trips: int = 0  # requests the cloud answered with a verification or a decision
    stale_requests: int = 0  # requests pipelined behind a rejection (answered without compute)
    edge_steps: int = 0
    edge_fills: int = 0  # calls that only ran layers early exits had skipped (the cloud needed their layer-K states)
    draft_depth: int = 0  # the controller's speculation depth at the end
    exits_by_layer: dict[str, int] = field(default_factory=dict)  # emitted edge drafts by the exit layer that drafted them

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class TokenEvent:
    token_id: int
    source: str
    position: int  # position of this token in the sequence (prompt positions come first)
    logprob: float | None = None  # the full model's (cloud-decided) or the exit head's (edge-decided) log-prob
    top_logprobs: list[tuple[int, float]] | None = None  # (token id, log-prob), best first, when asked for
    logprob_source: str | None = None  # FULL_MODEL or EXIT_HEAD: whose log-probs these are


@dataclass
class DecodeOptions:
    max_new_tokens: int = 64
    threshold: float = 0.9  # exit mode: exit when confidence >= threshold; > 1 never exits
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop_ids: Sequence[int] = ()
    lossless: bool = True  # no edge token is emitted before the cloud confirmed it
    catch_up: str = "lazy"  # exit mode: exited rows go up with the next request (lazy) or at once (eager)
    max_draft: int = 16  # drafts ahead of the last final token, at most (the controller picks fewer)
    fixed_draft: int = 0  # > 0: speculate exactly this deep, no adaptation (benchmarks)
    block_rows: int = 2  # rows per request while another is in flight
    max_inflight: int = 2  # verification requests in flight at once
    top_logprobs: int = 0  # alternatives per token to ask the cloud for

    def __post_init__(self) -> None:
        if self.max_draft < 1:
            raise ValueError(f"max_draft must be >= 1, got {self.max_draft}")
        if self.fixed_draft < 0 or self.fixed_draft > self.max_draft:
            raise ValueError(f"fixed_draft must be in 0..max_draft ({self.max_draft}), got {self.fixed_draft}")
        if self.block_rows < 1 or self.max_inflight < 1:
            raise ValueError(f"block_rows and max_inflight must be >= 1, got {self.block_rows} and {self.max_inflight}")
        if self.catch_up not in CATCH_UP_MODES:
            raise ValueError(f"catch_up must be one of {CATCH_UP_MODES}, got {self.catch_up!r}")


class DraftController:
    """How deep to speculate: enough drafts to cover a round trip, no deeper than drafts are likely to survive.

    Depth = round trip (EMA of request latency) / edge step (EMA) + 1, within 1..max_draft, and at most the k for
    which acceptance^k (EMA of accepted / verified drafts) stays above `min_chain`: with a head whose drafts are
    mostly wrong, speculating deep only uploads rows that will be stale. Drafting also stops once the product of
    the pending drafts' confidences falls below `min_chain`. A fixed depth disables all of it (benchmarks).
    """

    def __init__(self, max_draft: int, fixed: int = 0, min_chain: float = 0.05, smoothing: float = 0.3) -> None:
        self.max_draft, self.fixed, self.min_chain, self.smoothing = max_draft, fixed, min_chain, smoothing
        self.step_s: float | None = None
        self.round_trip_s: float | None = None
        self.acceptance: float | None = None

    def _ema(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.smoothing * (new - old)

    def observe_step(self, seconds: float) -> None:
        self.step_s = self._ema(self.step_s, seconds)

    def observe_round_trip(self, seconds: float) -> None:
        self.round_trip_s = self._ema(self.round_trip_s, seconds)

    def observe_verdict(self, accepted: int, verified: int) -> None:
        """`verified` drafts were checked, the first `accepted` kept (a rejection ends a request's verdicts)."""
        if verified:
            self.acceptance = self._ema(self.acceptance, accepted / verified)

    @property
    def depth(self) -> int:
        if self.fixed:
            return self.fixed
        if self.step_s is None or self.round_trip_s is None:
            return min(4, self.max_draft)
        cover = math.ceil(self.round_trip_s / max(self.step_s, 1e-4)) + 1
        if self.acceptance is not None and self.acceptance < 1.0:
            survive = math.log(self.min_chain) / math.log(max(self.acceptance, 1e-3))
            cover = min(cover, math.ceil(survive))
        return max(1, min(self.max_draft, cover))

    def keep_going(self, pending: int, chain: float) -> bool:
        """Whether to draft once more with `pending` unconfirmed drafts whose confidences multiply to `chain`."""
        if pending >= self.depth:
            return False
        return bool(self.fixed) or pending == 0 or chain >= self.min_chain


@dataclass
class _Block:
    start: int
    rows: int
    epoch: int
    drafts: list[int]  # positions whose tokens this request asks the cloud to verify (consecutive, ending at start+rows)
    sent_at: float


class RollbackLog:
    """Where each epoch began: a copy of the session the cloud holds at an older epoch is valid only below the
    first position rolled back since then (a replica the session left and came back to)."""

    def __init__(self) -> None:
        self._floor: dict[int, int] = {}  # epoch -> rows that stayed valid when it began

    def record(self, epoch: int, kept: int) -> None:
        self._floor[epoch] = min(kept, self._floor.get(epoch, kept))

    def valid_prefix(self, since_epoch: int, have: int) -> int:
        floors = [kept for epoch, kept in self._floor.items() if epoch > since_epoch]
        return min([have, *floors])


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
        # Edge steps always run off the event loop, so an answer that arrives during a step is taken at once.
        self._own_executor = executor is None
        self.executor = executor or ThreadPoolExecutor(1, thread_name_prefix="offramp-edge-step")
        self.stats = GenerationStats()

    @property
    def mode(self) -> str:
        return "collaborative" if self.link is not None else "edge-standalone"

    async def stream(self, prompt_ids: Sequence[int], options: DecodeOptions) -> AsyncIterator[TokenEvent]:
        """Yield tokens as they become final; `self.stats` is complete when the iterator ends."""
        if not prompt_ids:
            raise ValueError("the prompt must contain at least one token")
        run = _Run(self, list(prompt_ids), options)
        self.stats = run.stats
        try:
            async for event in run.events():
                yield event
        finally:
            await run.finish()

    def close(self) -> None:
        """Stop the decoder's own step thread (a shared executor is left to its owner)."""
        if self._own_executor:
            self.executor.shutdown(wait=False)


class _Run:
    """One generation's state machine. All of it runs on the event loop; only `runtime.run` runs on the executor.

    Positions: tokens[0:len(prompt)] is the prompt; tokens[i] for larger i is the token at position i (final below
    `final`, a draft or the cloud's replacement above); rows[i] is the layer-K state of tokens[i] (the edge has run
    positions below runtime.length == len(rows)); the cloud holds rows below `sent` at `epoch`, as far as the edge
    knows; `verifying` are the positions whose drafts are in requests in flight.

    With several exits (offramp.edge.multi_exit) a step that stops at an early exit leaves its row None until a
    later step (or `fill`, when the cloud needs it) runs the skipped layers: rows below `_ready` can go up.
    """

    def __init__(self, decoder: CollaborativeDecoder, prompt: list[int], options: DecodeOptions) -> None:
        self.d = decoder
        self.runtime = decoder.runtime
        self.link = decoder.link
        self.options = options
        self.prompt_len = len(prompt)
        self.tokens = list(prompt)
        self.conf: dict[int, float] = {}  # position -> confidence of its draft
        self.q: dict[int, SparseDistribution] = {}  # sampled drafts: the edge's q
        self.head_logprob: dict[int, tuple[float, list[tuple[int, float]] | None]] = {}  # position -> the exit head's (log-prob, top)
        self.cloud_logprob: dict[int, tuple[float, list[tuple[int, float]] | None]] = {}
        self.decided_by: dict[int, str] = {}  # position -> CLOUD for cloud-confirmed tokens
        self.drafted_at: dict[int, int] = {}  # position -> the exit layer whose head drafted its token
        self.rows: list[np.ndarray | None] = []
        self.final = self.prompt_len
        self.emitted = self.prompt_len
        self.sent = 0
        self.epoch = 0
        self.rollbacks = RollbackLog()
        self.rebase = False
        self.rebase_base = 0  # the epoch of the copy a pending rebase was worked out against
        self.resyncs = 0
        self.verifying: set[int] = set()
        self.inflight: dict[asyncio.Task, _Block] = {}
        self.stepping: asyncio.Future | None = None
        self.pending_truncate: int | None = None
        self.link_up = self.link is not None
        self.session = uuid.uuid4().hex
        self.seed = options.seed if options.seed is not None else int(np.random.default_rng().integers(0, 2**63 - 1))
        self.controller = DraftController(options.max_draft, options.fixed_draft)
        self.stats = GenerationStats()
        self.started = time.perf_counter()
        self.limit = min(self.prompt_len + options.max_new_tokens, self.runtime.max_positions)  # positions < limit
        self.stop_at: int | None = None  # a final stop token's position
        self._link_before = _link_counters(self.link)
        self._session_open = False

    # -- the generator -----------------------------------------------------------------------------------------

    async def events(self) -> AsyncIterator[TokenEvent]:
        self.runtime.reset()  # a runtime from a pool still holds its last sequence
        if self.link is not None:
            try:
                await self.link.open_session(self.session)
                self._session_open = True
            except CloudUnavailableError:
                self.link_up = False
        step = await self._run_step(list(self.tokens))
        self._record(step.hidden, len(self.tokens) - step.pending, len(self.tokens))
        self._draft_after(step)
        while True:
            self._advance_final()
            while self.emitted < self.final:
                event = self._event(self.emitted)
                self.emitted += 1
                yield event
            if self._done():
                return
            self._send_blocks()
            if self.stepping is None and self._can_step():
                self.stepping = asyncio.ensure_future(self._step())
            elif self.stepping is None and self._needs_fill():
                self.stepping = asyncio.ensure_future(self._fill())
            waits = {t for t in (self.stepping, *self.inflight) if t is not None}
            if not waits:
                if self._send_blocks(force=True):
                    continue
                if self._ready < len(self.rows):  # nothing else to do: complete the rows early exits left
                    self.stepping = asyncio.ensure_future(self._fill())
                    continue
                raise RuntimeError("decode loop stalled: nothing to run and nothing in flight")  # a bug, not a fallback
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)  # a step or an answer changes the state
            for task in done:  # an error that is not the cloud being away (a refusal, a bug) ends the generation
                if not task.cancelled() and task.exception() is not None:
                    raise task.exception()

    async def finish(self) -> None:
        """Cancel what is in flight, close the cloud session, complete the stats."""
        for task in list(self.inflight):
            task.cancel()
        if self.inflight:
            await asyncio.gather(*self.inflight, return_exceptions=True)
        if self.stepping is not None:
            await asyncio.gather(self.stepping, return_exceptions=True)
        if self.link is not None and self._session_open:
            try:
                await self.link.close_session(self.session)
            except CloudUnavailableError:
                pass
        s = self.stats
        s.full_layer_tokens = (self.prompt_len + max(s.tokens - 1, 0)) * self.d.total_layers
        after = _link_counters(self.link)
        s.bytes_up, s.bytes_down = after[0] - self._link_before[0], after[1] - self._link_before[1]
        s.wall_s = time.perf_counter() - self.started
        s.draft_depth = self.controller.depth

    def _done(self) -> bool:
        if self.stop_at is not None and self.emitted > self.stop_at:
            return True
        return self.emitted >= self.limit

    # -- edge steps --------------------------------------------------------------------------------------------

    async def _run_step(self, ids: list[int]) -> EdgeStep:
        t0 = time.perf_counter()
        step = await asyncio.get_running_loop().run_in_executor(self.d.executor, self.runtime.run, ids)
        if len(ids) == 1:
            self.controller.observe_step(time.perf_counter() - t0)
        self.stats.edge_steps += 1
        return step

    def _can_step(self) -> bool:
        """Run the newest token if it is needed and speculation may go that deep."""
        position = len(self.rows)  # the token to run
        if position >= len(self.tokens) or position >= self.limit - 1:
            return False  # no token to run yet, or the last position needs no row (the row before verifies it)
        if self.tokens[position] in self.options.stop_ids:
            return False
        pending = len(self.tokens) - self.final
        if not self.link_up:
            return True  # alone: every token is final as soon as it is drafted
        chain = math.prod(self.conf.get(p, 1.0) for p in range(self.final, len(self.tokens)))
        return self.controller.keep_going(pending, chain)

    async def _step(self) -> None:
        position = len(self.rows)
        try:
            step = await self._run_step([self.tokens[position]])
        finally:
            self.stepping = None
        keep = self._settle(step.hidden, position + 1 - step.pending, position + 1)
        if position >= keep:
            return  # the step ran a token the cloud replaced
        self._draft_after(step)

    def _needs_fill(self) -> bool:
        """The cloud needs a row an early exit left pending: a draft to verify (or, eagerly, a catch-up) waits on it."""
        ready = self._ready
        if ready == len(self.rows) or self.link is None or not self.link_up:
            return False
        if self.options.catch_up == "eager" and not self.options.lossless:
            return True
        return any(not self._exits(p) for p in range(max(self.final, ready + 1), len(self.tokens)))

    async def _fill(self) -> None:
        end = len(self.rows)
        try:
            hidden = await asyncio.get_running_loop().run_in_executor(self.d.executor, self.runtime.fill)
        finally:
            self.stepping = None
        self.stats.edge_fills += 1
        self._settle(hidden, end, end)

    def _settle(self, hidden: np.ndarray, filled_end: int, length: int) -> int:
        """After an edge call that left the runtime `length` positions long: apply a rollback that arrived
        meanwhile, then record the rows it completed (positions filled_end - len(hidden)..filled_end-1) below the
        rollback point; returns that point (`length` without a rollback)."""
        keep = length
        if self.pending_truncate is not None:  # a rejection arrived while the call ran
            keep, self.pending_truncate = min(length, self.pending_truncate), None
            self.runtime.truncate(keep)
        self._record(hidden, filled_end, keep)
        return keep

    def _record(self, hidden: np.ndarray, filled_end: int, length: int) -> None:
        """Rows of positions filled_end - len(hidden)..filled_end-1 (those below `length`); None up to `length`."""
        for position, row in zip(range(filled_end - len(hidden), min(filled_end, length)), hidden):
            if position < len(self.rows):
                self.rows[position] = row
            elif position == len(self.rows):
                self.rows.append(row)
        self.rows.extend([None] * (length - len(self.rows)))

    @property
    def _ready(self) -> int:
        """Rows with their layer-K state: all but those early exits left pending (always the newest)."""
        n = len(self.rows)
        while n and self.rows[n - 1] is None:
            n -= 1
        return n

    def _draft_after(self, step: EdgeStep) -> None:
        """The edge's proposal for the position after the newest row."""
        position = len(self.rows)
        if position >= self.limit or position < len(self.tokens):
            return
        options = self.options
        logits = step.logits
        if step.confidence is not None:
            self.conf[position] = step.confidence
        else:
            self.conf[position] = float(self.d.confidence(logits, step.hidden[-1] if len(step.hidden) else None))
        self.drafted_at[position] = step.exit_layer if step.exit_layer is not None else self.runtime.exit_layer
        if options.sampling.greedy:
            token = int(np.argmax(logits))
        else:
            q = draft_distribution(logits, options.sampling)
            token = draw_draft(q, position_uniforms(self.seed, position).draft)
            self.q[position] = q
        self.head_logprob[position] = head_logprobs(logits, token, options.top_logprobs)
        self.tokens.append(token)

    # -- final tokens and events -------------------------------------------------------------------------------

    def _exits(self, position: int) -> bool:
        """Exit mode: the draft is confident enough to be final without the cloud (an early exit's draft is: its
        own rule passed it)."""
        if self.options.lossless:
            return False
        early = self.drafted_at.get(position, self.runtime.exit_layer) != self.runtime.exit_layer
        return early or self.conf.get(position, 0.0) >= self.options.threshold

    def _advance_final(self) -> None:
        while self.final < len(self.tokens) and (self.stop_at is None or self.final <= self.stop_at):
            position = self.final
            if self.decided_by.get(position) == CLOUD:
                source = CLOUD
            elif self.link is None:
                source = EDGE
            elif not self.link_up and position not in self.verifying:
                source = FALLBACK
            elif self._exits(position) and position not in self.verifying:
                source = EDGE
            else:
                return
            self.decided_by[position] = source
            if self.tokens[position] in self.options.stop_ids and self.stop_at is None:
                self.stop_at = position
            self.final += 1

    def _event(self, position: int) -> TokenEvent:
        source = self.decided_by[position]
        s = self.stats
        s.tokens += 1
        s.edge_exits += source == EDGE
        s.escalations += source == CLOUD
        s.fallback_tokens += source == FALLBACK
        if position in self.drafted_at:  # the edge's own draft (a cloud replacement has none)
            layer = str(self.drafted_at[position])
            s.exits_by_layer[layer] = s.exits_by_layer.get(layer, 0) + 1
        if s.tokens == 1:
            s.ttft_s = time.perf_counter() - self.started
        if source == CLOUD and position in self.cloud_logprob:
            (logprob, top), whose = self.cloud_logprob[position], FULL_MODEL
        elif position in self.head_logprob:
            (logprob, top), whose = self.head_logprob[position], EXIT_HEAD
        else:  # a cloud token from a cloud that sent no log-probs
            logprob, top, whose = None, None, None
        return TokenEvent(self.tokens[position], source, position, logprob, top, whose)

    # -- requests ----------------------------------------------------------------------------------------------

    def _send_blocks(self, force: bool = False) -> bool:
        """Send the rows the cloud lacks when the policy says so; True if a request went out.

        At once when nothing is in flight; while others are, once `block_rows` have gathered (up to
        `max_inflight` requests); and whatever is left when the edge stops speculating. Lazy exit mode holds rows
        whose predictions are all final (exited) until a draft needs verifying. While the cloud is unreachable a
        single catch-up request probes it; the first answer puts the generation back on the cloud.
        """
        if self.link is None:
            return False
        sent_any = False
        while self.sent < self._ready:
            end, drafts = self._next_block(self.sent)
            if not self.link_up:
                if self.inflight:
                    break
                end, drafts = self._ready, []
            elif not drafts and self.options.catch_up == "lazy" and not force:
                break
            else:
                unsent = end - self.sent
                speculating = self.stepping is not None or self._can_step()
                room = len(self.inflight) < self.options.max_inflight and unsent >= self.options.block_rows
                if self.inflight and not room and speculating and not force:
                    break
            self._send(self.sent, end, drafts)
            sent_any, force = True, False
        return sent_any

    def _next_block(self, start: int) -> tuple[int, list[int]]:
        """(end row, drafts) of the next request from row `start`: rows whose predictions need no check first
        (final tokens, and in exit mode confident ones), then the rows predicting drafts to verify. An exited
        token never goes to the cloud as a draft, so exit mode's output does not depend on timing: a block is cut
        before a row that would predict one after a draft."""
        drafts: list[int] = []
        end = start
        for row in range(start, self._ready):
            position = row + 1
            is_draft = self.final <= position < len(self.tokens) and not self._exits(position)
            if is_draft:
                drafts.append(position)
            elif drafts:
                break
            end = row + 1
        return end, drafts

    def _send(self, start: int, end: int, drafts: list[int]) -> None:
        assert self.link is not None
        hidden = np.stack(self.rows[start:end])  # type: ignore[arg-type]  (rows below _ready are filled)
        sampled = not self.options.sampling.greedy
        request = ExtendRequest(
            self.session, start, hidden, epoch=self.epoch, want_token=False,
            drafts=[self.tokens[p] for p in drafts],
            draft_q=[self.q[p] for p in drafts] if sampled and drafts else None,
            sampling=self.options.sampling, seed=self.seed, top_logprobs=self.options.top_logprobs, rebase=self.rebase,
            base_epoch=self.rebase_base,
        )
        block = _Block(start, end - start, self.epoch, drafts, time.perf_counter())
        self.sent = end
        self.rebase = False
        self.verifying.update(drafts)
        task = asyncio.ensure_future(self._request(request, block))
        self.inflight[task] = block

    async def _request(self, request: ExtendRequest, block: _Block) -> None:
        assert self.link is not None
        try:
            result = await self.link.extend(request)
        except StaleRequestError as exc:
            self.stats.stale_requests += 1
            self._on_stale(block, exc)
        except ContextMismatchError as exc:
            self._on_mismatch(block, exc)
        except CloudUnavailableError:
            self._on_unavailable(block)
        else:
            self._on_result(block, result)
        finally:
            self.inflight.pop(asyncio.current_task(), None)  # type: ignore[arg-type]
            self.verifying.difference_update(block.drafts)

    def _on_result(self, block: _Block, result: DeepResult) -> None:
        s = self.stats
        self.link_up = True  # an answer: the cloud is there (again)
        s.round_trips += 1
        s.cloud_layer_tokens += block.rows * getattr(self.link, "deep_layers", 0)
        self.controller.observe_round_trip(time.perf_counter() - block.sent_at)
        self.resyncs = 0
        self._check_exits(block, result)
        if block.epoch != self.epoch:
            return  # answered at an epoch the edge has already left (cannot happen in order; be safe)
        s.drafted_tokens += len(block.drafts)
        s.accepted_drafts += result.accepted
        self.controller.observe_verdict(result.accepted, min(len(block.drafts), result.accepted + 1))
        n = len(result.token_logprobs)
        lps = list(zip(result.token_logprobs, result.top_ids or [None] * n, result.top_logprobs or [None] * n))
        for i, position in enumerate(block.drafts[: result.accepted]):
            self._confirm(position, lps[i] if i < n else None)
        if result.accepted < len(block.drafts):
            s.rejected_drafts += 1
            s.draft_rollbacks += 1
            i = result.accepted
            self._replace(block.drafts[i], int(result.token), result.epoch, lps[i] if i < n else None)

    def _confirm(self, position: int, lp) -> None:
        self.decided_by[position] = CLOUD
        if lp is not None:
            value, ids, values = lp
            self.cloud_logprob[position] = (value, list(zip(ids, values)) if ids is not None else None)

    def _replace(self, position: int, token: int, epoch: int, lp) -> None:
        """The cloud's token at `position` replaces the edge's draft; everything after it was a wrong guess."""
        self.epoch = epoch
        self.rollbacks.record(epoch, position)
        del self.tokens[position:]
        self.tokens.append(token)
        self._confirm(position, lp)
        keep = position  # rows below `position` stay; the replacement's row is computed next
        del self.rows[keep:]
        self.sent = min(self.sent, keep)
        for p in [p for p in self.conf if p > position]:
            del self.conf[p]
        self.drafted_at = {p: layer for p, layer in self.drafted_at.items() if p < position}
        self.q = {p: q for p, q in self.q.items() if p < position}
        self.head_logprob = {p: v for p, v in self.head_logprob.items() if p < position}
        self._truncate(keep)

    def _truncate(self, keep: int) -> None:
        if self.stepping is not None:  # the runtime is busy in the executor: truncate when its step returns
            self.pending_truncate = keep if self.pending_truncate is None else min(keep, self.pending_truncate)
        elif self.runtime.length > keep:
            self.runtime.truncate(keep)

    def _check_exits(self, block: _Block, result: DeepResult) -> None:
        """Catch-up rows predict exited tokens too: count how often the edge's exits agreed with the full model."""
        for offset, predicted in enumerate(result.predicted):
            position = block.start + offset + 1
            if position in block.drafts or position >= len(self.tokens):
                continue
            if self.decided_by.get(position) == EDGE:
                self.stats.checked_exits += 1
                self.stats.agreed_exits += int(predicted) == self.tokens[position]

    def _on_stale(self, block: _Block, exc: StaleRequestError) -> None:
        """The cloud is at a newer epoch. Usually the edge already heard of the rejection; if not (its answer was
        lost), adopt the cloud's epoch and re-send from what it holds."""
        self.link_up = True
        if exc.epoch > self.epoch:
            self.rollbacks.record(exc.epoch, exc.length)
            self._resync(exc.length, exc.epoch, rebase=False)

    def _on_mismatch(self, block: _Block, exc: ContextMismatchError) -> None:
        """The cloud holds fewer rows (evicted, restarted) or holds the session at another epoch (a replica the
        session left): re-send from a prefix both sides agree on."""
        self.link_up = True
        self.resyncs += 1
        if self.resyncs > MAX_RESYNCS:
            self._on_unavailable(block)
            return
        if exc.epoch == self.epoch:
            self._resync(exc.have, self.epoch, rebase=False)
        elif exc.epoch < self.epoch:  # an older copy: valid only below what was rolled back since
            self._resync(self.rollbacks.valid_prefix(exc.epoch, exc.have), self.epoch, rebase=True, base=exc.epoch)
        else:  # the cloud rejected drafts whose answers never reached the edge
            self.rollbacks.record(exc.epoch, exc.have)
            self._resync(exc.have, exc.epoch, rebase=False)

    def _resync(self, have: int, epoch: int, rebase: bool, base: int = 0) -> None:
        self.epoch = max(self.epoch, epoch)
        self.sent = min(self.sent, have)
        if rebase:  # only the copy held at `base` may take it (another replica's copy answers what it holds)
            self.rebase, self.rebase_base = True, base

    def _on_unavailable(self, block: _Block) -> None:
        """The cloud cannot be reached: pending drafts and what follows become edge-fallback tokens, and what it
        holds is unknown until it answers again."""
        self.link_up = False
        self.sent = min(self.sent, block.start)


def _link_counters(link: CloudLink | None) -> tuple[int, int]:
    if link is None:
        return (0, 0)
    return (link.stats.bytes_up, link.stats.bytes_down)

