"""Edge runtimes for concurrent requests: one KV cache each, one ONNX Runtime session shared by all of them."""

from __future__ import annotations

import copy
from collections.abc import Callable

from offramp.edge.runtime import EdgeRuntime
from offramp.shared.errors import OfframpError


class BusyError(OfframpError):
    """Every session slot is taken; the caller should retry later (HTTP 429)."""


def clone_runtime(first: EdgeRuntime) -> EdgeRuntime:
    """Another runtime over the same inference session (ORT runs concurrent calls safely); only the KV is new."""
    clone = copy.copy(first)
    clone.reset()  # fresh KV buffers: reset() rebinds them, so nothing is shared with `first`
    return clone


class RuntimePool:
    """Reuse idle runtimes, create up to `limit`, refuse beyond it."""

    def __init__(self, first: EdgeRuntime, limit: int, factory: Callable[[], EdgeRuntime] | None = None) -> None:
        self._idle: list[EdgeRuntime] = [first]
        self._factory = factory or (lambda: clone_runtime(first))
        self.limit = limit
        self.active = 0

    def acquire(self) -> EdgeRuntime:
        if self.active >= self.limit:
            raise BusyError(f"all {self.limit} edge sessions are busy; retry shortly")
        runtime = self._idle.pop() if self._idle else self._factory()
        self.active += 1
        return runtime

    def release(self, runtime: EdgeRuntime, reusable: bool) -> None:
        """A runtime that may still be running in a worker thread (a cancelled step) is dropped, not reused."""
        self.active -= 1
        if reusable:
            self._idle.append(runtime)
