"""Batched deep-layer forwards give every session what it gets alone, and refusals stay in their slot."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from offramp.cloud.batcher import Batcher
from offramp.cloud.context import ContextManager, SessionOwnerError
from offramp.cloud.engine import DeepEngine, PositionError
from offramp.shared.contract import ContextMismatchError, ExtendRequest
from offramp.models.split import CloudPart
from tests.conftest import make_tiny_llama

K = 2


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(num_layers=4, seed=3)


def engine(model, budget=None, sessions=()) -> DeepEngine:
    eng = DeepEngine(CloudPart(model, K), ContextManager(budget_bytes=budget))
    for sid in sessions:
        eng.contexts.open(sid)
    return eng


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 64)).astype(np.float32)


def schedule(num_sessions: int, steps: int) -> list[list[ExtendRequest]]:
    """Per step, one request per session: a prompt first (lengths vary), then mixed catch-up chunks and single rows."""
    plan, starts = [], [0] * num_sessions
    for step in range(steps):
        batch = []
        for s in range(num_sessions):
            n = 3 + 4 * s if step == 0 else 1 + (s + step) % 3
            batch.append(ExtendRequest(f"s{s}", starts[s], rows(n, 100 * s + step), want_token=True))
            starts[s] += n
        plan.append(batch)
    return plan


def test_batched_equals_one_by_one(model) -> None:
    names = [f"s{s}" for s in range(6)]
    alone, together = engine(model, sessions=names), engine(model, sessions=names)
    for batch in schedule(6, 5):
        expected = [alone.extend(r) for r in batch]
        got = together.extend_batch(batch)
        for e, g in zip(expected, got):
            assert g.token == e.token and g.predicted == e.predicted and g.length == e.length
            assert np.allclose(g.logprobs, e.logprobs, atol=1e-4)
    assert together.layer_tokens == alone.layer_tokens
    for sid in names:  # and the caches hold the same numbers
        a, b = alone.contexts.get(sid), together.contexts.get(sid)
        assert a.length == b.length
        for layer in range(alone.cloud.num_layers):
            (ka, va), (kb, vb) = a.kv.layer(layer, a.length), b.kv.layer(layer, b.length)
            assert torch.allclose(ka, kb, atol=1e-5) and torch.allclose(va, vb, atol=1e-5)


def test_a_bad_request_keeps_its_error_and_the_others_run(model) -> None:
    eng = engine(model, sessions="acd")
    eng.contexts.open("owned", owner="alice")
    batch = [
        ExtendRequest("a", 0, rows(4, 1)),
        ExtendRequest("b", 5, rows(2, 2)),  # the cloud holds nothing of b: re-upload from 0
        ExtendRequest("c", 0, rows(3, 3)[:, :10]),  # wrong width
        ExtendRequest("owned", 0, rows(1, 4), owner="mallory"),
        ExtendRequest("d", 0, rows(2, 5)),
    ]
    out = eng.extend_batch(batch)
    assert out[0].length == 4 and out[4].length == 2
    assert isinstance(out[1], ContextMismatchError) and out[1].have == 0  # never opened
    assert isinstance(out[2], PositionError) and isinstance(out[3], SessionOwnerError)


def test_same_session_twice_in_a_batch_runs_in_order(model) -> None:
    eng, ref = engine(model, sessions="st"), engine(model, sessions="st")
    first, second = ExtendRequest("s", 0, rows(3, 1)), ExtendRequest("s", 3, rows(1, 2))
    out = eng.extend_batch([first, ExtendRequest("t", 0, rows(2, 3)), second])
    assert out[2].token == [ref.extend(first), ref.extend(second)][1].token and out[2].length == 4


def test_budget_is_enforced_after_the_batch(model) -> None:
    # nothing fits: after each batch only its most recent session stays (and sessions holding nothing)
    eng = engine(model, budget=1, sessions=["t", "s0", "s1", "s2"])
    out = eng.extend_batch([ExtendRequest(f"s{i}", 0, rows(2, i)) for i in range(3)])
    assert all(r.length == 2 for r in out)  # every request was answered before any eviction
    assert [c.session_id for c in eng.contexts.sessions()] == ["t", "s2"] and eng.contexts.evictions == 2
    eng.extend_batch([ExtendRequest("t", 0, rows(1, 7))])
    assert [c.session_id for c in eng.contexts.sessions()] == ["t"] and eng.contexts.evictions == 3
    again = eng.extend_batch([ExtendRequest("s0", 2, rows(1, 9))])
    assert isinstance(again[0], ContextMismatchError) and again[0].have == 0


async def test_batcher_serves_concurrent_sessions_like_alone(model) -> None:
    names = [f"s{s}" for s in range(16)]
    alone, shared = engine(model, sessions=names), engine(model, sessions=names)
    batcher = Batcher(shared, max_batch=8, window_s=0.002)
    sizes = []
    batcher.on_batch = lambda size, seconds: sizes.append(size)

    async def session(s: int) -> list[int]:
        tokens, start = [], 0
        for step in range(6):
            n = 2 + s if step == 0 else 1
            tokens.append((await batcher.submit(ExtendRequest(f"s{s}", start, rows(n, 10 * s + step)))).token)
            start += n
        return tokens

    together = await asyncio.gather(*(session(s) for s in range(16)))
    await batcher.aclose()
    for s in range(16):
        start, expected = 0, []
        for step in range(6):
            n = 2 + s if step == 0 else 1
            expected.append(alone.extend(ExtendRequest(f"s{s}", start, rows(n, 10 * s + step))).token)
            start += n
        assert together[s] == expected
    assert max(sizes) > 1 and max(sizes) <= 8 and sum(sizes) == 16 * 6


async def test_batcher_raises_each_requests_own_error(model) -> None:
    batcher = Batcher(engine(model, sessions="x"))
    with pytest.raises(ContextMismatchError):
        await batcher.submit(ExtendRequest("x", 3, rows(1, 0)))
    assert (await batcher.submit(ExtendRequest("x", 0, rows(2, 0)))).length == 2
    await batcher.aclose()
    with pytest.raises(RuntimeError, match="closed"):
        await batcher.submit(ExtendRequest("x", 2, rows(1, 0)))


async def test_closing_the_batcher_answers_the_batch_it_is_computing(model) -> None:
    """Issue 14, defect 3: aclose() cancelled the worker mid-forward and that batch's waiters hung forever."""
    import threading

    eng = engine(model, sessions="ab")
    started, release = threading.Event(), threading.Event()
    original = eng.extend_batch

    def slow(reqs):
        started.set()
        release.wait(10)
        return original(reqs)

    eng.extend_batch = slow
    batcher = Batcher(eng, window_s=0)
    running = asyncio.ensure_future(batcher.submit(ExtendRequest("a", 0, rows(2, 1))))
    while not started.is_set():
        await asyncio.sleep(0.01)
    queued = asyncio.ensure_future(batcher.submit(ExtendRequest("b", 0, rows(2, 2))))
    await asyncio.sleep(0.01)
    closing = asyncio.ensure_future(batcher.aclose())
    await asyncio.sleep(0.05)
    release.set()
    await asyncio.wait_for(closing, 10)
    assert (await asyncio.wait_for(running, 1)).length == 2  # the batch in the forward was answered
    with pytest.raises(RuntimeError, match="closed before"):
        await asyncio.wait_for(queued, 1)  # the one still queued was told
