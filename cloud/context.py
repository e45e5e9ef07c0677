"""The cloud's context manager: its one table of sessions, each with its deep-layer KV, under a memory budget.

Every fact about a session lives in its `SessionContext`: owner, codec, the connection that last used it (for
eviction notices), its epoch, the arrival-order lock of its requests and its KV. Sessions are kept in LRU order;
going over the byte budget evicts the least recently used others, an idle TTL expires forgotten sessions, and
close() frees one at once. An evicted session is not an error for the edge: the next request for it says how
many positions the cloud holds (zero) and the edge re-uploads from there.

KV is preallocated per session and written at explicit positions (gpt-fast's `KVCache.update(input_pos, k, v)`):
a step writes its rows in place, a rollback only moves `length` back, and capacity doubles when it runs out,
so nothing is concatenated or re-padded per step. `nbytes` is the capacity actually allocated.

The table is touched from the event loop (open, close, lookups) and from the engine's worker thread (commits,
budget evictions); one lock makes each operation atomic, and nothing slow runs under it.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

import torch

from offramp.shared import protocol as p
from offramp.shared.contract import SessionError

CAPACITY_STEP = 16  # KV capacity is a multiple of this many positions ...
CAPACITY_HEADROOM = 8  # ... with 1/8 of the length to spare: regrowths are geometric (x1.125), waste is small


class UnknownSessionError(SessionError):
    code = p.UNKNOWN_SESSION


class SessionOwnerError(SessionError):
    code = p.FORBIDDEN


class SessionLimitError(SessionError):
    code = p.TOO_MANY_SESSIONS


class SessionKV:
    """Preallocated keys and values of every layer: one [layers, 2, kv_heads, capacity, head_dim] buffer."""

    def __init__(self, layers: int, kv_heads: int, head_dim: int, max_positions: int, device: torch.device, dtype: torch.dtype) -> None:
        self.shape = (layers, 2, kv_heads, 0, head_dim)
        self.max_positions = max_positions
        self.buffer = torch.empty(self.shape, device=device, dtype=dtype)

    @property
    def capacity(self) -> int:
        return self.buffer.shape[3]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def growth(self, length: int) -> int:
        """Bytes `reserve(length)` would add."""
        if length <= self.capacity:
            return 0
        per_position = self.buffer.element_size() * self.shape[0] * 2 * self.shape[2] * self.shape[4]
        return (self._capacity_for(length) - self.capacity) * per_position

    def _capacity_for(self, length: int) -> int:
        wanted = length + length // CAPACITY_HEADROOM
        return min(self.max_positions, max(length, -(-wanted // CAPACITY_STEP) * CAPACITY_STEP))

    def reserve(self, length: int, keep: int) -> None:
        """Room for `length` positions; the first `keep` survive a regrowth (the rest are about to be written)."""
        if length <= self.capacity:
            return
        capacity = self._capacity_for(length)
        grown = torch.empty((*self.shape[:3], capacity, self.shape[4]), device=self.buffer.device, dtype=self.buffer.dtype)
        if keep:
            grown[:, :, :, :keep] = self.buffer[:, :, :, :keep]
        self.buffer = grown

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k/v [kv_heads, n, head_dim] at positions start..start+n-1; return views of positions 0..start+n-1."""
        end = start + k.shape[1]
        self.buffer[layer, 0, :, start:end] = k
        self.buffer[layer, 1, :, start:end] = v
        return self.buffer[layer, 0, :, :end], self.buffer[layer, 1, :, :end]

    def layer(self, index: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one layer's keys and values at positions 0..length-1, each [kv_heads, length, head_dim]."""
        return self.buffer[index, 0, :, :length], self.buffer[index, 1, :, :length]


@dataclass(eq=False)
class SessionContext:
    session_id: str
    owner: str
    codec: str = "fp32"
    kv: SessionKV | None = None
    length: int = 0  # positions whose deep KV is valid
    epoch: int = 0  # bumped by every rejection of a draft (see offramp.shared.contract)
    connection: Any = None  # whatever last sent for this session (the server's EdgeConnection); told of evictions
    last_used: float = field(default_factory=time.monotonic)
    _lock: asyncio.Lock | None = None

    @property
    def nbytes(self) -> int:
        return 0 if self.kv is None else self.kv.nbytes

    @property
    def lock(self) -> asyncio.Lock:
        """Serialises this session's requests in arrival order (created on the event loop, used only there)."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    def truncate(self, length: int) -> None:
        """Forget positions >= length (the edge rolled back); the buffer stays, to be written again."""
        self.length = min(self.length, length)


class ContextManager:
    """The session table: per-session deep KV with a byte budget (LRU eviction), an idle TTL and session caps."""

    def __init__(
        self,
        budget_bytes: int | None = None,
        ttl_s: float | None = None,
        max_sessions: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.budget_bytes = budget_bytes
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.clock = clock
        self._sessions: OrderedDict[str, SessionContext] = OrderedDict()
        self._mutex = threading.RLock()
        self.evictions = 0
        self.on_evict: Callable[[SessionContext, str], None] | None = None

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    @property
    def nbytes(self) -> int:
        with self._mutex:
            return sum(ctx.nbytes for ctx in self._sessions.values())

    def sessions(self) -> list[SessionContext]:
        """A snapshot of the table, least recently used first."""
        with self._mutex:
            return list(self._sessions.values())

    def count(self, owner: str) -> int:
        with self._mutex:
            return sum(1 for ctx in self._sessions.values() if ctx.owner == owner)

    def peek(self, session_id: str) -> SessionContext | None:
        """The session if held, without touching its LRU position or checking its owner."""
        return self._sessions.get(session_id)

    def open(self, session_id: str, owner: str = "", codec: str = "fp32", connection: Any = None,
             per_owner_limit: int | None = None, evictable: Callable[[SessionContext], bool] | None = None) -> SessionContext:
        """Create (or re-open, for the same owner) a session.

        At the owner's limit, its sessions `evictable` says are abandoned (their connection is gone) make room,
        oldest first, before the open is refused: a crashed edge must not lock its token out until a restart.
        """
        with self._mutex:
            existing = self._sessions.get(session_id)
            if existing is not None:
                if existing.owner != owner:
                    raise SessionOwnerError(f"session {session_id!r} belongs to another client")
                existing.codec = codec
                existing.connection = connection if connection is not None else existing.connection
                self._touch(existing)
                return existing
            self.expire()
            if per_owner_limit is not None:
                mine = [ctx for ctx in self._sessions.values() if ctx.owner == owner]
                for ctx in list(mine):
                    if len(mine) < per_owner_limit:
                        break
                    if evictable is not None and evictable(ctx):
                        self._evict(ctx.session_id, "abandoned")
                        mine.remove(ctx)
                if len(mine) >= per_owner_limit:
                    raise SessionLimitError(f"this client holds {len(mine)} sessions, the per-client limit ({per_owner_limit})")
            if self.max_sessions is not None and len(self._sessions) >= self.max_sessions:
                raise SessionLimitError(f"the cloud holds {len(self._sessions)} sessions, its limit ({self.max_sessions})")
            ctx = SessionContext(session_id, owner, codec, connection=connection, last_used=self.clock())
            self._sessions[session_id] = ctx
            return ctx

    def get(self, session_id: str, owner: str = "") -> SessionContext:
        with self._mutex:
            ctx = self._sessions.get(session_id)
            if ctx is None:
                raise UnknownSessionError(f"no session {session_id!r} (never opened, closed, or evicted)")
            if ctx.owner != owner:
                raise SessionOwnerError(f"session {session_id!r} belongs to another client")
            self._touch(ctx)
            return ctx

    def lookup(self, session_id: str, owner: str = "") -> SessionContext:
        """get(), but an evicted or unknown session is re-opened empty so its owner can re-upload."""
        with self._mutex:
            if session_id not in self._sessions:
                return self.open(session_id, owner)
            return self.get(session_id, owner)

    def commit(self, ctx: SessionContext, length: int, enforce: bool = True) -> None:
        """A session's KV is valid up to `length`; then enforce the budget by evicting least recently used others.

        A batch commits all its sessions with enforce=False and enforces once after, so no session of the
        batch is evicted between its forward pass and its commit.
        """
        with self._mutex:
            ctx.length = length
            if ctx.session_id in self._sessions:
                self._touch(ctx)
            if enforce:
                self.enforce_budget(keep={ctx.session_id})

    def enforce_budget(self, keep: Collection[str] = ()) -> None:
        """Evict least recently used sessions until the budget holds: others first, then those in `keep` (the ones
        just extended), but never the most recent one, which would only be re-uploaded at its next step."""
        if self.budget_bytes is None:
            return
        with self._mutex:
            total = sum(ctx.nbytes for ctx in self._sessions.values())
            if total <= self.budget_bytes:
                return
            order = list(self._sessions)  # least recently used first
            newest = order[-1] if order else None
            for sid in [s for s in order if s not in keep] + [s for s in order if s in keep and s != newest]:
                if total <= self.budget_bytes:
                    break
                size = self._sessions[sid].nbytes
                if size == 0:  # evicting an empty session frees nothing
                    continue
                total -= size
                self._evict(sid, "memory budget")

    def make_room(self, extra: int, keep: Collection[str] = ()) -> None:
        """Before `extra` bytes are allocated for the sessions in `keep`: evict others, least recently used first,
        so the budget holds while the batch runs, not only after it."""
        if self.budget_bytes is None or extra <= 0:
            return
        with self._mutex:
            total = sum(ctx.nbytes for ctx in self._sessions.values()) + extra
            for sid in [s for s in self._sessions if s not in keep]:
                if total <= self.budget_bytes:
                    break
                size = self._sessions[sid].nbytes
                if size:
                    total -= size
                    self._evict(sid, "memory budget")

    def expire(self) -> list[str]:
        """Evict sessions idle longer than the TTL; returns their ids."""
        if self.ttl_s is None:
            return []
        with self._mutex:
            now = self.clock()
            stale = [sid for sid, ctx in self._sessions.items() if now - ctx.last_used > self.ttl_s]
            for sid in stale:
                self._evict(sid, "idle ttl")
            return stale

    def close(self, session_id: str, owner: str = "") -> bool:
        with self._mutex:
            ctx = self._sessions.get(session_id)
            if ctx is None:
                return False
            if ctx.owner != owner:
                raise SessionOwnerError(f"session {session_id!r} belongs to another client")
            del self._sessions[session_id]
            return True

    def evict(self, session_id: str, reason: str = "requested") -> None:
        with self._mutex:
            if session_id in self._sessions:
                self._evict(session_id, reason)

    def _evict(self, session_id: str, reason: str) -> None:
        ctx = self._sessions.pop(session_id)
        self.evictions += 1
        if self.on_evict is not None:
            self.on_evict(ctx, reason)

    def _touch(self, ctx: SessionContext) -> None:
        ctx.last_used = self.clock()
        self._sessions.move_to_end(ctx.session_id)
