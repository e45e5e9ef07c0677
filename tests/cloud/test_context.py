"""The cloud context manager: budget with LRU eviction, idle TTL, explicit close, ownership, session cap."""

from __future__ import annotations

import pytest
import torch

from offramp.cloud.context import ContextManager, SessionContext, SessionKV, SessionLimitError, SessionOwnerError, UnknownSessionError


def fill(cm: ContextManager, ctx: SessionContext, positions: int) -> None:
    """Give a session `positions` of KV (two layers, 2 heads x 4 dims, fp32: 128 bytes a position) and commit it."""
    if ctx.kv is None:
        ctx.kv = SessionKV(2, 2, 4, positions, torch.device("cpu"), torch.float32)
    ctx.kv.reserve(positions, keep=ctx.length)
    cm.commit(ctx, positions)


def test_budget_evicts_least_recently_used_first() -> None:
    evicted = []
    cm = ContextManager(budget_bytes=3 * 1280)  # 10 positions = 1280 bytes
    cm.on_evict = lambda ctx, reason: evicted.append((ctx.session_id, reason))
    for sid in "abc":
        fill(cm, cm.open(sid), 10)
    cm.get("a")  # a is now most recent; b is the oldest
    fill(cm, cm.open("d"), 10)
    assert evicted == [("b", "memory budget")]
    assert "b" not in cm and all(s in cm for s in "acd")
    assert cm.nbytes <= 3 * 1280 and cm.evictions == 1


def test_the_session_being_served_is_never_evicted_for_itself() -> None:
    cm = ContextManager(budget_bytes=100)
    ctx = cm.open("big")
    fill(cm, ctx, 10)
    assert "big" in cm and ctx.length == 10


def test_idle_sessions_expire_after_ttl() -> None:
    now = [0.0]
    cm = ContextManager(ttl_s=5.0, clock=lambda: now[0])
    cm.open("old")
    now[0] = 3.0
    cm.open("new")
    now[0] = 6.0
    assert cm.expire() == ["old"]
    assert "new" in cm


def test_close_and_unknown_sessions() -> None:
    cm = ContextManager()
    cm.open("s")
    assert cm.close("s") is True and cm.close("s") is False
    with pytest.raises(UnknownSessionError, match="'s'"):
        cm.get("s")
    assert cm.lookup("s").length == 0  # lookup re-opens an evicted/unknown session empty


def test_sessions_belong_to_their_owner() -> None:
    cm = ContextManager()
    cm.open("s", owner="alice")
    for call in (lambda: cm.get("s", "mallory"), lambda: cm.open("s", "mallory"), lambda: cm.close("s", "mallory")):
        with pytest.raises(SessionOwnerError):
            call()
    assert cm.get("s", "alice").owner == "alice"


def test_session_cap() -> None:
    cm = ContextManager(max_sessions=2)
    cm.open("a"), cm.open("b")
    with pytest.raises(SessionLimitError, match="limit"):
        cm.open("c")
    cm.close("a")
    cm.open("c")


def test_sessions_the_budget_or_the_ttl_evicted_no_longer_count_against_their_owner() -> None:
    """Issue 14, defect 1 (its eviction half): the per-client limit counted a side map that only Close emptied, so
    sessions evicted under the budget or expired stayed counted and locked their token out."""
    now = [0.0]
    cm = ContextManager(budget_bytes=2 * 1280, ttl_s=5.0, clock=lambda: now[0])
    for sid in ("a", "b"):
        fill(cm, cm.open(sid, owner="alice", per_owner_limit=2), 10)
    with pytest.raises(SessionLimitError, match="per-client limit"):
        cm.open("c", owner="alice", per_owner_limit=2)
    fill(cm, cm.open("x", owner="bob"), 10)  # the budget evicts alice's oldest
    assert "a" not in cm and cm.count("alice") == 1
    fill(cm, cm.open("c", owner="alice", per_owner_limit=2), 1)
    now[0] = 10.0  # every session idles past the TTL
    assert [cm.open(sid, owner="alice", per_owner_limit=2).session_id for sid in ("d", "e")] == ["d", "e"]
    assert sorted(ctx.session_id for ctx in cm.sessions()) == ["d", "e"]


def test_truncate_drops_later_positions() -> None:
    cm = ContextManager()
    ctx = cm.open("s")
    fill(cm, ctx, 10)
    before = cm.nbytes
    ctx.truncate(4)
    assert ctx.length == 4
    assert ctx.kv.layer(0, ctx.length)[0].shape[1] == 4  # only the kept positions are read
    assert cm.nbytes == before == 1280  # the buffer is still allocated, and counted (a view would undercount it)


def test_nbytes_can_be_read_while_the_worker_thread_changes_sessions() -> None:
    """The server reads nbytes on its event loop (gauges, /healthz) while its worker thread opens, commits and
    closes sessions; under load that raised 'OrderedDict mutated during iteration' into a close frame's reply."""
    import threading

    cm = ContextManager(budget_bytes=20 * 1280)
    stop = threading.Event()

    def worker() -> None:
        i = 0
        while not stop.is_set():
            sid = f"s{i % 40}"
            fill(cm, cm.open(sid), 10)
            if i % 3 == 0:
                cm.close(f"s{(i + 7) % 40}")
            i += 1

    thread = threading.Thread(target=worker)
    thread.start()
    try:
        for _ in range(20000):
            assert 0 <= cm.nbytes <= 21 * 1280
    finally:
        stop.set()
        thread.join()
