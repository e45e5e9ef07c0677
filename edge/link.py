"""The edge's view of the cloud: one interface, an in-process and a network implementation.

The decode loop only knows `CloudLink`; whether the deep layers run in this process (`--cloud local`) or
behind a WebSocket does not change a token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Protocol

from offramp.cloud.engine import DeepEngine
from offramp.shared.contract import ContextMismatchError, DeepResult, ExtendRequest
from offramp.shared.codecs import get_codec
from offramp.shared.errors import OfframpError


class CloudUnavailableError(OfframpError):
    """The cloud cannot be reached in time; the edge falls back to its own exit head."""


@dataclass
class LinkStats:
    bytes_up: int = 0
    bytes_down: int = 0
    round_trips: int = 0


class CloudLink(Protocol):
    codec: str
    deep_layers: int  # layers the cloud runs per position (N - K)
    stats: LinkStats

    async def open_session(self, session_id: str) -> None: ...

    async def extend(self, request: ExtendRequest) -> DeepResult:
        """Send layer-K states (and drafts) of positions request.start..; raises ContextMismatchError (re-upload
        from `have`), StaleRequestError (pipelined behind a rejected draft) or CloudUnavailableError."""
        ...

    async def close_session(self, session_id: str) -> None: ...

    async def aclose(self) -> None: ...


class LocalCloudLink:
    """The cloud engine in this process; hidden states still go through the codec, so results match the wire."""

    def __init__(self, engine: DeepEngine, codec: str = "fp32") -> None:
        self.engine = engine
        self.codec = codec
        self._codec = get_codec(codec)
        self.deep_layers = engine.cloud.num_layers
        self.stats = LinkStats()

    async def open_session(self, session_id: str) -> None:
        self.engine.contexts.open(session_id, codec=self.codec)

    async def extend(self, request: ExtendRequest) -> DeepResult:
        return self.run(request)

    def run(self, request: ExtendRequest) -> DeepResult:
        """The request through the codec and the engine; a session the engine lost is re-opened for the re-upload."""
        rows, width = request.hidden.shape
        payload = self._codec.encode(request.hidden)
        self.stats.bytes_up += len(payload)
        decoded = self._codec.decode(payload, rows, width)
        try:
            result = self.engine.extend(dataclasses.replace(request, hidden=decoded))
        except ContextMismatchError as exc:
            if exc.have == 0 and request.session_id not in self.engine.contexts:
                self.engine.contexts.open(request.session_id, codec=self.codec)
            raise
        self.stats.bytes_down += 8 * len(result.predicted) + (4 if result.token is not None else 0)
        self.stats.round_trips += 1
        return result

    async def close_session(self, session_id: str) -> None:
        self.engine.contexts.close(session_id)

    async def aclose(self) -> None:
        return None
