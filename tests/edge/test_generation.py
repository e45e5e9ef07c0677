"""The collaborative decode loop on tiny models with the in-process cloud: exactness, accounting, recovery."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from offramp.cloud.full_model import FullModelRunner
from offramp.cloud.local_link import local_link as build_local_link
from offramp.edge.generation import CLOUD, EDGE, FALLBACK, CollaborativeDecoder, DecodeOptions
from offramp.edge.link import CloudUnavailableError
from offramp.models.reference_runtime import TorchEdgeRuntime
from offramp.models.split import EdgePart
from offramp.shared.sampling import SamplingParams
from tests.conftest import make_tiny_llama

K = 2
PROMPT = [5, 17, 3, 99, 42, 8]


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(num_layers=4, seed=11)


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


async def test_always_escalate_equals_full_model(model) -> None:
    decoder = CollaborativeDecoder(TorchEdgeRuntime(EdgePart(model, K)), build_local_link(model, K, "fp32"), 4)
    tokens, sources = await run(decoder, DecodeOptions(max_new_tokens=25, threshold=1.5))
    assert tokens == full_greedy(model, PROMPT, 25)
    assert set(sources) == {CLOUD}
    stats = decoder.stats
    assert stats.escalations == 25 and stats.edge_exits == 0
    # every position (prompt + all generated but the last) went through the 2 deep layers once
    positions = len(PROMPT) + 24
    assert stats.cloud_layer_tokens == positions * 2
    assert stats.full_layer_tokens == positions * 4
    # bytes are the frames' (open, 25 escalations, close): the fp32 payload of every position plus msgpack framing
    payload = positions * 64 * 4
    assert payload < stats.bytes_up <= payload + 160 * 27
    assert stats.bytes_down > 0 and stats.bytes_up == decoder.link.stats.bytes_up  # one request: the link's own count


async def test_never_escalating_is_edge_only_and_sends_nothing(model) -> None:
    decoder = CollaborativeDecoder(TorchEdgeRuntime(EdgePart(model, K)), build_local_link(model, K, "fp32"), 4)
    tokens, sources = await run(decoder, DecodeOptions(max_new_tokens=20, threshold=0.0))
    assert tokens == edge_only_greedy(model, PROMPT, 20)
    assert set(sources) == {EDGE}
    assert decoder.stats.cloud_layer_tokens == 0
    assert decoder.stats.bytes_up < 200  # only the session's open and close frames: no hidden state went up


async def test_mixed_exits_catch_up_and_check_agreement(model) -> None:
    """Alternate exit and escalate: the cloud catches up exited positions and the edge learns its agreement."""
    flips = iter([1.0, 0.0] * 50)
    decoder = CollaborativeDecoder(
        TorchEdgeRuntime(EdgePart(model, K)), build_local_link(model, K, "fp32"), 4, confidence=lambda lg, h: next(flips)
    )
    tokens, sources = await run(decoder, DecodeOptions(max_new_tokens=12, threshold=0.5))
    assert sources == [EDGE, CLOUD] * 6
    assert decoder.stats.checked_exits == 6  # every exited token was checked by the following catch-up
    # cloud tokens are the full model's prediction given the (possibly edge-chosen) prefix
    runner = FullModelRunner(model)
    for i, (token, source) in enumerate(zip(tokens, sources)):
        if source == CLOUD:
            assert token == next(runner.generate_ids(PROMPT + tokens[:i], 1))


class EvictingLink:
    """Wraps a local link and evicts the session on the cloud before every `every`-th request."""

    def __init__(self, inner, every: int) -> None:
        self.inner, self.every, self.calls = inner, every, 0
        self.codec, self.deep_layers, self.stats = inner.codec, inner.deep_layers, inner.stats

    async def open_session(self, sid, stats=None):
        await self.inner.open_session(sid, stats)

    async def extend(self, sid, *args, stats=None):
        self.calls += 1
        if self.calls % self.every == 0:
            self.inner.engine.contexts.evict(sid, "test")
        return await self.inner.extend(sid, *args, stats=stats)

    async def close_session(self, sid, stats=None):
        await self.inner.close_session(sid, stats)

    async def aclose(self):
        await self.inner.aclose()


async def test_evicted_session_is_rebuilt_and_tokens_are_unchanged(model) -> None:
    options = DecodeOptions(max_new_tokens=20, threshold=1.5)
    baseline, _ = await run(CollaborativeDecoder(TorchEdgeRuntime(EdgePart(model, K)), build_local_link(model, K), 4), options)
    link = EvictingLink(build_local_link(model, K), every=4)
    decoder = CollaborativeDecoder(TorchEdgeRuntime(EdgePart(model, K)), link, 4)
    tokens, sources = await run(decoder, options)
    assert tokens == baseline and set(sources) == {CLOUD}
    assert link.inner.engine.contexts.evictions >= 4


class DeadLink:
    codec, deep_layers = "fp32", 2

    def __init__(self) -> None:
        from offramp.edge.link import LinkStats

        self.stats = LinkStats()

    async def open_session(self, sid, stats=None):
        raise CloudUnavailableError("down")

    async def extend(self, *args, stats=None):
        raise CloudUnavailableError("down")

    async def close_session(self, sid, stats=None):
        raise CloudUnavailableError("down")

    async def aclose(self):
        return None


async def test_unreachable_cloud_falls_back_to_the_edge(model) -> None:
    decoder = CollaborativeDecoder(TorchEdgeRuntime(EdgePart(model, K)), DeadLink(), 4)
    tokens, sources = await run(decoder, DecodeOptions(max_new_tokens=10, threshold=1.5))
    assert tokens == edge_only_greedy(model, PROMPT, 10)
    assert sources == [FALLBACK] * 10 and decoder.stats.fallback_tokens == 10


async def test_seeded_sampling_is_reproducible_and_stops_on_stop_id(model) -> None:
    options = DecodeOptions(max_new_tokens=30, threshold=0.3, sampling=SamplingParams(1.0, 0.9), seed=123)
    make = lambda: CollaborativeDecoder(TorchEdgeRuntime(EdgePart(model, K)), build_local_link(model, K), 4)  # noqa: E731
    first, _ = await run(make(), options)
    second, _ = await run(make(), options)
    assert first == second
    stop = first[3]
    options.stop_ids = [stop]
    stopped, _ = await run(make(), options)
    assert stopped == first[: first.index(stop) + 1]


async def test_empty_prompt_is_refused(model) -> None:
    decoder = CollaborativeDecoder(TorchEdgeRuntime(EdgePart(model, K)), None, 4)
    with pytest.raises(ValueError, match="at least one token"):
        await run(decoder, DecodeOptions(), prompt=[])


async def test_eager_catch_up_gives_the_lazy_tokens_and_checks_every_exit(model) -> None:
    """Eager uploads go out as tokens exit; escalations then carry one position and the tokens do not change."""
    results = {}
    for mode in ("lazy", "eager"):
        flips = iter([1.0, 1.0, 0.0] * 50)
        link = build_local_link(model, K, "fp32")
        decoder = CollaborativeDecoder(TorchEdgeRuntime(EdgePart(model, K)), link, 4, confidence=lambda lg, h: next(flips))
        results[mode] = (*(await run(decoder, DecodeOptions(max_new_tokens=15, threshold=0.5, catch_up=mode))), decoder.stats, link.stats)
    lazy, eager = results["lazy"], results["eager"]
    assert eager[0] == lazy[0] and eager[1] == lazy[1] == [EDGE, EDGE, CLOUD] * 5
    assert eager[2].checked_exits == lazy[2].checked_exits == 10
    assert eager[2].cloud_layer_tokens == lazy[2].cloud_layer_tokens  # the same positions, sent at other times
    assert eager[3].round_trips > lazy[3].round_trips


def test_unknown_catch_up_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="catch_up"):
        DecodeOptions(catch_up="sometimes")


class SlowLink:
    """The in-process cloud behind a fixed delay, like a WAN round trip."""

    def __init__(self, inner, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s
        self.codec, self.deep_layers, self.stats = inner.codec, inner.deep_layers, inner.stats

    async def open_session(self, session_id, stats=None):
        await self.inner.open_session(session_id, stats)

    async def extend(self, *args, stats=None):
        await asyncio.sleep(self.delay_s)
        return await self.inner.extend(*args, stats=stats)

    async def close_session(self, session_id, stats=None):
        await self.inner.close_session(session_id, stats)

    async def aclose(self):
        pass


def every_third_escalates(logits, hidden) -> float:
    """A deterministic confidence (a function of the edge's outputs only), so two runs decide alike."""
    return float(int(abs(float(hidden[0])) * 1e4) % 3 != 0)


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(0.9, 0.95)], ids=["greedy", "sampled"])
async def test_drafting_during_escalations_changes_no_token(model, sampling) -> None:
    """Drafted tokens are kept only when the cloud confirms the guess they grew from: the output is the plain loop's."""
    results = {}
    for draft in (0, 4):
        link = SlowLink(build_local_link(model, K, "fp32"), 0.02)
        decoder = CollaborativeDecoder(TorchEdgeRuntime(EdgePart(model, K)), link, 4, confidence=every_third_escalates)
        opts = DecodeOptions(max_new_tokens=40, threshold=0.5, sampling=sampling, seed=3, draft_ahead=draft)
        results[draft] = (*(await run(decoder, opts)), decoder.stats)
    plain, drafted = results[0], results[4]
    assert drafted[0] == plain[0] and drafted[1] == plain[1]
    assert CLOUD in plain[1] and EDGE in plain[1]
    if sampling.greedy:  # the edge's guess often matches: drafts are kept
        assert drafted[2].drafted_tokens > 0
    else:  # sampled guesses rarely match: drafts are thrown away and the edge rolls back
        assert drafted[2].draft_rollbacks > 0
    assert drafted[2].escalations == plain[2].escalations and drafted[2].cloud_layer_tokens == plain[2].cloud_layer_tokens


async def test_drafting_through_an_unreachable_cloud_keeps_the_drafts(model) -> None:
    class DeadLink(SlowLink):
        attempts = 0

        async def extend(self, *args, stats=None):
            self.attempts += 1
            await asyncio.sleep(self.delay_s)
            raise CloudUnavailableError("gone")

    outs = {}
    for draft in (0, 4):
        link = DeadLink(build_local_link(model, K), 0.02)
        decoder = CollaborativeDecoder(TorchEdgeRuntime(EdgePart(model, K)), link, 4, confidence=every_third_escalates)
        outs[draft] = (*(await run(decoder, DecodeOptions(max_new_tokens=30, threshold=0.5, draft_ahead=draft))), decoder.stats, link.attempts)
    assert outs[4][0] == outs[0][0] == edge_only_greedy(model, PROMPT, 30)
    assert outs[4][1] == outs[0][1] and FALLBACK in outs[0][1]
    # the edge kept decoding while each doomed escalation was out (its drafts kept), instead of sitting idle
    assert outs[4][2].drafted_tokens > 0 and outs[0][2].drafted_tokens == 0 and outs[4][3] == outs[0][3]


@pytest.mark.parametrize("threshold", [0.0, 0.5])
async def test_lossless_mode_gives_exactly_the_full_models_greedy_tokens(model, threshold) -> None:
    """Edge drafts are verified by the cloud's catch-up predictions before they are emitted."""
    confidence = (lambda lg, h: 1.0) if threshold == 0.0 else every_third_escalates
    rejected = 0
    for prompt in (PROMPT, [1, 2, 3], list(range(40, 70)), [100, 7, 55, 23]):
        decoder = CollaborativeDecoder(TorchEdgeRuntime(EdgePart(model, K)), build_local_link(model, K, "fp32"), 4, confidence=confidence)
        tokens, sources = await run(decoder, DecodeOptions(max_new_tokens=30, threshold=threshold, lossless=True, max_draft=5), prompt)
        assert tokens == full_greedy(model, prompt, 30)
        stats = decoder.stats
        assert EDGE in sources and CLOUD in sources
        assert stats.edge_exits + stats.escalations == 30
        assert stats.escalations < 30  # fewer round trips than tokens: several drafts verified per trip
        rejected += stats.rejected_drafts
    assert rejected > 0  # and some drafts were wrong, rolled back, and never shown


async def test_lossless_mode_without_a_cloud_still_completes(model) -> None:
    class Gone(SlowLink):
        async def extend(self, *args, stats=None):
            raise CloudUnavailableError("gone")

    decoder = CollaborativeDecoder(TorchEdgeRuntime(EdgePart(model, K)), Gone(build_local_link(model, K), 0), 4, confidence=lambda lg, h: 1.0)
    tokens, sources = await run(decoder, DecodeOptions(max_new_tokens=20, threshold=0.0, lossless=True))
    assert tokens == edge_only_greedy(model, PROMPT, 20) and set(sources) == {FALLBACK}
