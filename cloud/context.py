"""The cloud's context manager: each edge session's deep-layer KV cache, under a memory budget.

Sessions are kept in LRU order; going over the byte budget evicts the least recently used others, an idle TTL
expires forgotten sessions, and close() frees one at once. An evicted session is not an error for the edge: the
next request for it says how many positions the cloud holds (zero) and the edge re-uploads from there.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from offramp.models.decoder import KV
from offramp.shared import protocol as p
from offramp.shared.contract import SessionError


class UnknownSessionError(SessionError):
    code = p.UNKNOWN_SESSION


class SessionOwnerError(SessionError):
    code = p.FORBIDDEN


class SessionLimitError(SessionError):
    code = p.TOO_MANY_SESSIONS


@dataclass
class SessionContext:
    session_id: str
    owner: str
    kv: list[KV] | None = None
    length: int = 0  # positions whose deep KV is held
    last_used: float = field(default_factory=time.monotonic)

    @property
    def nbytes(self) -> int:
        if self.kv is None:
            return 0
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.kv)

    def truncate(self, length: int) -> None:
        """Forget positions >= length (the edge rolled back)."""
        if length < self.length and self.kv is not None:
            self.kv = [(k[:, :, :length], v[:, :, :length]) for k, v in self.kv]
        self.length = min(self.length, length)


class ContextManager:
    """Per-session deep KV with a byte budget (LRU eviction), an idle TTL and a session cap."""

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
        self.evictions = 0
        self.on_evict: Callable[[SessionContext, str], None] | None = None

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: str) -> bool:
        return session_id in self._sessions

    @property
    def nbytes(self) -> int:
        """Safe to read from another thread (the server's event loop, while its worker commits): list() copies the
        sessions in one step under the GIL, where iterating the dict itself would race the worker's changes."""
        return sum(ctx.nbytes for ctx in list(self._sessions.values()))

    def open(self, session_id: str, owner: str = "") -> SessionContext:
        """Create (or re-open, for the same owner) a session."""
        existing = self._sessions.get(session_id)
        if existing is not None:
            if existing.owner != owner:
                raise SessionOwnerError(f"session {session_id!r} belongs to another client")
            self._touch(existing)
            return existing
        self.expire()
        if self.max_sessions is not None and len(self._sessions) >= self.max_sessions:
            raise SessionLimitError(f"the cloud holds {len(self._sessions)} sessions, its limit ({self.max_sessions})")
        ctx = SessionContext(session_id, owner, last_used=self.clock())
        self._sessions[session_id] = ctx
        return ctx

    def get(self, session_id: str, owner: str = "") -> SessionContext:
        ctx = self._sessions.get(session_id)
        if ctx is None:
            raise UnknownSessionError(f"no session {session_id!r} (never opened, closed, or evicted)")
        if ctx.owner != owner:
            raise SessionOwnerError(f"session {session_id!r} belongs to another client")
        self._touch(ctx)
        return ctx

    def lookup(self, session_id: str, owner: str = "") -> SessionContext:
        """get(), but an evicted or unknown session is re-opened empty so the edge can re-upload."""
        if session_id not in self._sessions:
            return self.open(session_id, owner)
        return self.get(session_id, owner)

    def commit(self, ctx: SessionContext, kv: list[KV], length: int, enforce: bool = True) -> None:
        """Store a session's grown KV, then enforce the budget by evicting least recently used others.

        A batch commits all its sessions with enforce=False and enforces once after, so no session of the
        batch is evicted between its forward pass and its commit.
        """
        ctx.kv, ctx.length = kv, length
        self._touch(ctx)
        if enforce:
            self.enforce_budget(keep=ctx.session_id)

    def enforce_budget(self, keep: str | None = None) -> None:
        if self.budget_bytes is None:
            return
        total = self.nbytes
        for sid in list(self._sessions):
            if total <= self.budget_bytes:
                break
            if sid == keep:
                continue
            total -= self._sessions[sid].nbytes
            self._evict(sid, "memory budget")

    def expire(self) -> list[str]:
        """Evict sessions idle longer than the TTL; returns their ids."""
        if self.ttl_s is None:
            return []
        now = self.clock()
        stale = [sid for sid, ctx in self._sessions.items() if now - ctx.last_used > self.ttl_s]
        for sid in stale:
            self._evict(sid, "idle ttl")
        return stale

    def close(self, session_id: str, owner: str = "") -> bool:
        ctx = self._sessions.get(session_id)
        if ctx is None:
            return False
        if ctx.owner != owner:
            raise SessionOwnerError(f"session {session_id!r} belongs to another client")
        del self._sessions[session_id]
        return True

    def evict(self, session_id: str, reason: str = "requested") -> None:
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
