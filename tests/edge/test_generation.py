"""The collaborative decode loop on tiny models with the in-process cloud: exactness, pipelining, accounting, recovery."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from offramp.cloud.full_model import FullModelRunner
from offramp.cloud.local_link import local_link as build_local_link
from offramp.edge.decode_loop import (
    CLOUD,
    EDGE,
    FALLBACK,
    CollaborativeDecoder,
    DecodeOptions,
    DraftController,
    RollbackLog,
)
from offramp.edge.link import CloudUnavailableError, LinkStats
from offramp.models.reference_runtime import TorchEdgeRuntime
from offramp.models.split import EdgePart
from offramp.shared.sampling import SamplingParams, token_distribution
from tests.conftest import make_tiny_llama
from tests.stats import assert_distributed_as

K = 2
PROMPT = [5, 17, 3, 99, 42, 8]
PROMPTS = (PROMPT, [1, 2, 3], list(range(40, 70)), [100, 7, 55, 23])


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(num_layers=4, seed=11)


def decoder_for(model, link="local", **kwargs) -> CollaborativeDecoder:
    if link == "local":
        link = build_local_link(model, K, "fp32")
    return CollaborativeDecoder(TorchEdgeRuntime(EdgePart(model, K)), link, 4, **kwargs)


async def run(decoder: CollaborativeDecoder, options: DecodeOptions, prompt=PROMPT):
    events = [e async for e in decoder.stream(prompt, options)]
    return [e.token_id for e in events], [e.source for e in events]


def full_greedy(model, prompt, n) -> list[int]:
    return list(FullModelRunner(model).generate_ids(prompt, n))


def edge_only_greedy(model, prompt, n) -> list[int]:
    runtime = TorchEdgeRuntime(EdgePart(model, K))
    tokens, step = [], runtime.run(prompt)
    for _ in range(n):
        tokens.append(int(np.argmax(step.logits)))
        step = runtime.run([tokens[-1]])
    return tokens


class Wrapped:
    """A link around the in-process one; subclasses change what extend does. Records every request."""

    def __init__(self, inner, delay_s: float = 0.0) -> None:
        self.inner, self.delay_s = inner, delay_s
        self.codec, self.deep_layers, self.stats = inner.codec, inner.deep_layers, inner.stats
        self.requests = []
        self.in_flight = self.max_in_flight = 0

    async def open_session(self, sid):
        await self.inner.open_session(sid)

    async def extend(self, request):
        self.requests.append(request)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            return await self.inner.extend(request)
        finally:
            self.in_flight -= 1

    async def close_session(self, sid):
        await self.inner.close_session(sid)

    async def aclose(self):
        await self.inner.aclose()


def every_third_unsure(logits, hidden) -> float:
    """A deterministic confidence (a function of the edge's outputs only), so two runs decide alike."""
    return float(int(abs(float(hidden[0])) * 1e4) % 3 != 0)


# -- lossless (the default) ------------------------------------------------------------------------------------


@pytest.mark.parametrize("depth", [0, 1, 3, 8], ids=["adaptive", "fixed1", "fixed3", "fixed8"])
async def test_lossless_greedy_is_exactly_the_full_model(model, depth) -> None:
    """Whatever the speculation depth, no token is emitted that the full model would not have chosen."""
    rejected = 0
    for prompt in PROMPTS:
        decoder = decoder_for(model)
        tokens, sources = await run(decoder, DecodeOptions(max_new_tokens=30, fixed_draft=depth), prompt)
        assert tokens == full_greedy(model, prompt, 30)
        assert set(sources) == {CLOUD} and decoder.stats.escalations == 30 and decoder.stats.edge_exits == 0
        rejected += decoder.stats.rejected_drafts
        assert decoder.stats.accepted_drafts + decoder.stats.rejected_drafts <= decoder.stats.drafted_tokens
    assert rejected > 0  # a random tiny model drafts badly: the rollback path ran


async def test_a_rejection_discards_only_what_followed_it(model) -> None:
    link = Wrapped(build_local_link(model, K, "fp32"))
    decoder = decoder_for(model, link)
    tokens, _ = await run(decoder, DecodeOptions(max_new_tokens=20, fixed_draft=4))
    assert tokens == full_greedy(model, PROMPT, 20)
    # each request continues where the cloud's context ends: after a rejection at position p, at p (the replaced
    # token's row), never from scratch; the prompt is uploaded once
    starts = [r.start for r in link.requests]
    assert starts[0] == 0 and starts.count(0) == 1
    assert sum(r.rows for r in link.requests) < len(PROMPT) + 20 + decoder.stats.rejected_drafts * 4 + 4


async def test_pipelining_keeps_several_verifications_in_flight(model) -> None:
    """Over a slow link the edge sends the next block before the first is answered; stale ones cost no compute."""
    stale = 0
    for prompt in PROMPTS:
        link = Wrapped(build_local_link(model, K, "fp32"), delay_s=0.02)
        decoder = decoder_for(model, link, confidence=lambda lg, h: 1.0)
        tokens, _ = await run(decoder, DecodeOptions(max_new_tokens=30, fixed_draft=6, block_rows=1, max_inflight=3), prompt)
        assert tokens == full_greedy(model, prompt, 30)
        assert link.max_in_flight > 1
        stats = decoder.stats
        assert stats.round_trips + stats.stale_requests == len(link.requests)
        stale += stats.stale_requests
    assert stale > 0  # blocks sent behind a rejection were answered without compute


async def test_an_answer_during_an_edge_step_is_taken_at_once(model) -> None:
    """Edge steps run off the event loop: with a cloud faster than the edge, speculation stays shallow instead
    of running all the way to its limit between two looks at the link."""

    class SlowRuntime(TorchEdgeRuntime):
        def run(self, ids):
            import time

            time.sleep(0.01)
            return super().run(ids)

    link = Wrapped(build_local_link(model, K, "fp32"))
    decoder = CollaborativeDecoder(SlowRuntime(EdgePart(model, K)), link, 4, confidence=lambda lg, h: 1.0)
    tokens, _ = await run(decoder, DecodeOptions(max_new_tokens=12, fixed_draft=8))
    assert tokens == full_greedy(model, PROMPT, 12)
    # the cloud answers within a step, so verdicts arrive before the edge drafts far: requests stay small
    assert max(len(r.drafts) for r in link.requests[1:]) <= 3


# -- sampled lossless: speculative sampling across the split ---------------------------------------------------


async def test_seeded_sampling_is_reproducible_whatever_the_depth_and_stops_on_stop_id(model) -> None:
    sampling = SamplingParams(1.0, 0.9)
    runs = []
    for depth in (1, 4, 0):
        tokens, sources = await run(decoder_for(model), DecodeOptions(max_new_tokens=30, sampling=sampling, seed=123, fixed_draft=depth))
        runs.append(tokens)
        assert set(sources) == {CLOUD}
    assert runs[0] == runs[1] == runs[2]
    stop = runs[0][3]
    stopped, _ = await run(decoder_for(model), DecodeOptions(max_new_tokens=30, sampling=sampling, seed=123, stop_ids=[stop]))
    assert stopped == runs[0][: runs[0].index(stop) + 1]


async def test_lossless_sampling_has_the_full_models_distribution(model) -> None:
    """Token frequencies over many seeds follow the full model's distribution, at the first generated position and
    (marginally) at the second, though every token went through edge drafts accepted or resampled by the cloud."""
    sampling = SamplingParams(temperature=0.5)
    prompt = [9, 4, 77, 31]
    runner = FullModelRunner(model)
    first_p = token_distribution(_full_logits(runner, prompt), sampling)
    second_p = np.zeros_like(first_p)
    for x, px in enumerate(first_p):
        if px > 1e-4:
            second_p += px * token_distribution(_full_logits(runner, prompt + [x]), sampling)
    second_p /= second_p.sum()
    first = np.zeros(len(first_p))
    second = np.zeros(len(first_p))
    decoder = decoder_for(model, confidence=lambda lg, h: 1.0)
    accepted = 0
    for seed in range(1500):
        tokens, _ = await run(decoder, DecodeOptions(max_new_tokens=2, sampling=sampling, seed=seed, fixed_draft=2), prompt)
        first[tokens[0]] += 1
        second[tokens[1]] += 1
        accepted += decoder.stats.accepted_drafts
    assert 0 < accepted < 2 * 1500  # both acceptance and resampling happened
    assert_distributed_as(first, first_p)
    assert_distributed_as(second, second_p)


@torch.inference_mode()
def _full_logits(runner: FullModelRunner, ids: list[int]) -> np.ndarray:
    logits, _ = runner._forward(ids, 0, None)
    return logits


# -- exit mode -------------------------------------------------------------------------------------------------


async def test_exit_mode_never_exiting_equals_full_model_and_counts_its_work(model) -> None:
    decoder = decoder_for(model)
    tokens, sources = await run(decoder, DecodeOptions(max_new_tokens=25, threshold=1.5, lossless=False, fixed_draft=1))
    assert tokens == full_greedy(model, PROMPT, 25) and set(sources) == {CLOUD}
    stats = decoder.stats
    assert stats.escalations == 25 and stats.edge_exits == 0
    # one draft at a time: every position (prompt + all generated but the last) went through the 2 deep layers once
    positions = len(PROMPT) + 24
    assert stats.cloud_layer_tokens == positions * 2 and stats.full_layer_tokens == positions * 4
    assert stats.bytes_up > positions * 64 * 4  # the frames carried every row's fp32 payload (64-wide), and framing


async def test_exit_mode_always_exiting_is_edge_only_and_sends_nothing(model) -> None:
    decoder = decoder_for(model)
    tokens, sources = await run(decoder, DecodeOptions(max_new_tokens=20, threshold=0.0, lossless=False))
    assert tokens == edge_only_greedy(model, PROMPT, 20)
    assert set(sources) == {EDGE}
    assert decoder.stats.round_trips == 0 and decoder.stats.cloud_layer_tokens == 0  # lazy: no row ever needed to go up
    assert decoder.stats.bytes_up < 200  # the session's open and close frames only


async def test_exit_mode_mixes_exits_and_cloud_tokens_and_checks_agreement(model) -> None:
    """Alternate exit and verify: the cloud catches up exited positions and the edge learns its agreement."""
    flips = iter([1.0, 0.0] * 50)
    decoder = decoder_for(model, confidence=lambda lg, h: next(flips))
    tokens, sources = await run(decoder, DecodeOptions(max_new_tokens=12, threshold=0.5, lossless=False, fixed_draft=1))
    assert sources == [EDGE, CLOUD] * 6
    assert decoder.stats.checked_exits == 6  # every exited token was checked by the following catch-up
    runner = FullModelRunner(model)
    for i, (token, source) in enumerate(zip(tokens, sources)):
        if source == CLOUD:  # the full model's choice given the (partly edge-chosen) prefix
            assert token == next(runner.generate_ids(PROMPT + tokens[:i], 1))


async def test_exit_mode_is_the_same_at_any_depth_and_with_eager_catch_up(model) -> None:
    """Drafting ahead and eager uploads change when rows travel, never a token."""
    outs = {}
    for name, opts in {"one": dict(fixed_draft=1), "deep": dict(fixed_draft=6), "eager": dict(fixed_draft=1, catch_up="eager")}.items():
        link = Wrapped(build_local_link(model, K, "fp32"), delay_s=0.005)
        decoder = decoder_for(model, link, confidence=every_third_unsure)
        tokens, sources = await run(decoder, DecodeOptions(max_new_tokens=40, threshold=0.5, lossless=False, **opts))
        outs[name] = (tokens, sources, decoder.stats, len(link.requests))
    assert outs["one"][0] == outs["deep"][0] == outs["eager"][0]
    assert outs["one"][1] == outs["deep"][1] == outs["eager"][1]
    assert EDGE in outs["one"][1] and CLOUD in outs["one"][1]
    assert outs["eager"][3] > outs["one"][3]  # eager sends exited rows in requests of their own
    assert outs["eager"][2].checked_exits >= outs["one"][2].checked_exits


def test_unknown_catch_up_mode_and_bad_depths_are_refused() -> None:
    with pytest.raises(ValueError, match="catch_up"):
        DecodeOptions(catch_up="sometimes")
    with pytest.raises(ValueError, match="max_draft"):
        DecodeOptions(max_draft=0)
    with pytest.raises(ValueError, match="fixed_draft"):
        DecodeOptions(max_draft=4, fixed_draft=5)


# -- the cloud going away, and coming back ---------------------------------------------------------------------


class EvictingLink(Wrapped):
    """Evicts the session on the cloud before every `every`-th request."""

    def __init__(self, inner, every: int) -> None:
        super().__init__(inner)
        self.every, self.calls = every, 0

    async def extend(self, request):
        self.calls += 1
        if self.calls % self.every == 0:
            self.inner.engine.contexts.evict(request.session_id, "test")
        return await super().extend(request)


async def test_an_evicted_session_is_rebuilt_and_tokens_are_unchanged(model) -> None:
    link = EvictingLink(build_local_link(model, K), every=4)
    tokens, sources = await run(decoder_for(model, link), DecodeOptions(max_new_tokens=20))
    assert tokens == full_greedy(model, PROMPT, 20) and set(sources) == {CLOUD}
    assert link.inner.engine.contexts.evictions >= 4


class DeadLink:
    codec, deep_layers = "fp32", 2

    def __init__(self) -> None:
        self.stats = LinkStats()

    async def open_session(self, sid):
        raise CloudUnavailableError("down")

    async def extend(self, request):
        raise CloudUnavailableError("down")

    async def close_session(self, sid):
        raise CloudUnavailableError("down")

    async def aclose(self):
        return None


@pytest.mark.parametrize("lossless", [True, False])
async def test_an_unreachable_cloud_means_edge_fallback_tokens(model, lossless) -> None:
    decoder = decoder_for(model, DeadLink())
    tokens, sources = await run(decoder, DecodeOptions(max_new_tokens=10, threshold=1.5, lossless=lossless))
    assert tokens == edge_only_greedy(model, PROMPT, 10)
    assert sources == [FALLBACK] * 10 and decoder.stats.fallback_tokens == 10


async def test_a_cloud_that_comes_back_takes_over_again(model) -> None:
    """Fallback while it is down, then the edge re-uploads what the cloud lacks and verifies again."""

    class Flaky(Wrapped):
        def __init__(self, inner) -> None:
            super().__init__(inner)
            self.down_for = 2

        async def extend(self, request):
            if len(self.requests) >= 2 and self.down_for > 0:
                self.down_for -= 1
                self.requests.append(request)
                raise CloudUnavailableError("a blip")
            return await super().extend(request)

    link = Flaky(build_local_link(model, K, "fp32"))
    decoder = decoder_for(model, link)
    tokens, sources = await run(decoder, DecodeOptions(max_new_tokens=30, fixed_draft=1))
    assert FALLBACK in sources and sources[-1] == CLOUD
    last_fallback = max(i for i, s in enumerate(sources) if s == FALLBACK)
    runner = FullModelRunner(model)
    for i in range(last_fallback + 1, len(tokens)):  # after the blip, the full model's tokens again
        assert tokens[i] == next(runner.generate_ids(PROMPT + tokens[:i], 1))


async def test_a_failing_first_request_still_closes_the_session(model) -> None:
    """Issue 14, defect 4: a prefill that failed left the cloud session open."""

    class Refusing(Wrapped):
        async def extend(self, request):
            raise RuntimeError("the cloud exploded")

    cloud = build_local_link(model, K, "fp32")
    decoder = decoder_for(model, Refusing(cloud))
    with pytest.raises(RuntimeError, match="exploded"):
        await run(decoder, DecodeOptions(max_new_tokens=5))
    assert len(cloud.engine.contexts) == 0


async def test_empty_prompt_is_refused(model) -> None:
    decoder = CollaborativeDecoder(TorchEdgeRuntime(EdgePart(model, K)), None, 4)
    with pytest.raises(ValueError, match="at least one token"):
        await run(decoder, DecodeOptions(), prompt=[])


# -- the draft controller and the rollback log ------------------------------------------------------------------


def test_the_controller_covers_a_round_trip_with_drafts() -> None:
    c = DraftController(max_draft=16)
    assert c.depth == 4  # before anything was measured
    for _ in range(20):
        c.observe_step(0.010)
        c.observe_round_trip(0.080)
    assert c.depth == 9  # 80 ms / 10 ms, plus the draft the answer verifies
    assert c.keep_going(3, chain=0.5) and not c.keep_going(3, chain=0.01) and not c.keep_going(9, chain=1.0)
    for _ in range(40):
        c.observe_round_trip(1.0)
    assert c.depth == 16  # capped
    for _ in range(40):
        c.observe_verdict(accepted=1, verified=2)  # half the drafts survive: 0.5^5 < 0.05, so 5 deep at most
    assert c.depth == 5
    for _ in range(40):
        c.observe_verdict(accepted=0, verified=1)  # nothing survives: one draft at a time
    assert c.depth == 1
    fixed = DraftController(max_draft=16, fixed=3)
    assert fixed.depth == 3 and fixed.keep_going(2, chain=0.0) and not fixed.keep_going(3, chain=1.0)


def test_a_copy_from_an_older_epoch_is_valid_below_every_rollback_since() -> None:
    log = RollbackLog()
    log.record(1, 40)
    log.record(2, 55)
    log.record(3, 30)
    assert log.valid_prefix(since_epoch=3, have=70) == 70
    assert log.valid_prefix(since_epoch=1, have=70) == 30
    assert log.valid_prefix(since_epoch=0, have=20) == 20
