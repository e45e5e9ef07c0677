"""One cloud link shared by every request of an edge service: each request's own view of it, and the link's health.

`RequestLink` is what a request's decode loop talks to: it forwards to the shared link with the request's own
`LinkStats`, so `bytes_up` / `bytes_down` are the bytes of that request's frames (Open, Extend, Close up;
Opened, Result/Stale/Evicted, Closed down) even while other requests use the same connection. `LinkHealth` is
what /healthz shows: `down` after a failure that means the cloud is gone, never after one request's timeout.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from offramp.edge.link import CloudLink, CloudTimeoutError, CloudUnavailableError, LinkStats
from offramp.shared.contract import DeepResult, ExtendRequest


@dataclass
class LinkHealth:
    """What the edge last saw of the cloud: `up` after a good call, `down` after it proved unreachable."""

    kind: str
    url: str | None = None
    state: str = "unknown"  # disabled | unknown | up | down
    last_error: str | None = None
    last_change: float = field(default_factory=time.time)
    failures: int = 0
    timeouts: int = 0  # requests that fell back because their answer was late (the link itself stayed up)

    def succeeded(self) -> None:
        if self.state != "up":
            self.state, self.last_change = "up", time.time()

    def failed(self, message: str) -> None:
        self.failures += 1
        self.last_error = message
        if self.state != "down":
            self.state, self.last_change = "down", time.time()

    def timed_out(self, message: str) -> None:
        self.timeouts += 1
        self.last_error = message

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.kind,
            "url": self.url,
            "state": self.state,
            "last_error": self.last_error,
            "failures": self.failures,
            "timeouts": self.timeouts,
            "since": self.last_change,
        }


class RequestLink:
    """One request's view of the shared link: its own byte counts, and it tells `LinkHealth` how the link fares."""

    def __init__(self, shared: CloudLink, health: LinkHealth) -> None:
        self.shared = shared
        self.health = health
        self.codec = shared.codec
        self.stats = LinkStats()

    @property
    def deep_layers(self) -> int:
        return self.shared.deep_layers  # known for sure only after the link's hello

    async def open_session(self, session_id: str, stats: LinkStats | None = None) -> None:
        await self._guard(self.shared.open_session(session_id, stats=self.stats))

    async def extend(self, request: ExtendRequest, stats: LinkStats | None = None) -> DeepResult:
        return await self._guard(self.shared.extend(request, stats=self.stats))

    async def close_session(self, session_id: str, stats: LinkStats | None = None) -> None:
        await self._guard(self.shared.close_session(session_id, stats=self.stats))

    async def aclose(self) -> None:
        return None  # the shared link outlives requests

    async def _guard(self, call: Any) -> Any:
        try:
            result = await call
        except CloudTimeoutError as exc:
            self.health.timed_out(str(exc))
            raise
        except CloudUnavailableError as exc:
            self.health.failed(str(exc))
            raise
        self.health.succeeded()
        return result
