"""The edge's view of the cloud: one interface (`CloudLink`), what its failures mean, and where links come from.

The decode loop only knows `CloudLink`; whether the deep layers run in this process (`--cloud local`, found
through the `offramp.cloud_links` entry point so the edge never imports the cloud) or behind a WebSocket
(`offramp.edge.ws_link`) does not change a token.

Two kinds of failure, handled differently on purpose:
- `CloudUnavailableError` (unreachable, dropped, too slow, busy): the edge emits its own token, marked
  `edge-fallback`, and keeps going. `CloudTimeoutError` is the one-request form: that request falls back, the
  link (shared by every request of a daemon) stays up.
- `CloudRefusedError` (wrong token, another model, another protocol version, a codec it does not serve, another
  client's session): falling back would hide a misconfiguration behind edge-only answers, so it is an error
  with the cloud's message, at start-up or in the request.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any, Protocol

from offramp.shared import protocol as p
from offramp.shared.contract import DeepResult, ExtendRequest
from offramp.shared.errors import OfframpError

LINK_ENTRY_POINT_GROUP = "offramp.cloud_links"
LOCAL_LINK = "local"
CLOUD_EXTRA_HINT = "install the cloud extra (pip install 'offramp[cloud]')"

# Error codes that mean "this edge is misconfigured for this cloud", not "the cloud is not there right now".
REFUSAL_CODES = frozenset({p.UNAUTHORIZED, p.MODEL_MISMATCH, p.VERSION_MISMATCH, p.BAD_CODEC, p.FORBIDDEN})


class CloudUnavailableError(OfframpError):
    """The cloud cannot answer in time (unreachable, dropped, busy); the edge falls back to its own exit head."""


class CloudTimeoutError(CloudUnavailableError):
    """One request went unanswered for its timeout: it falls back, but the link is not marked down for the others."""


class CloudRefusedError(OfframpError):
    """The cloud refused this edge (`code` in REFUSAL_CODES): an error with the cloud's message, never a fallback."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"cloud refused ({code}): {message}")
        self.code = code
        self.cloud_message = message


class LinkUnavailableError(OfframpError):
    """A link kind this install cannot provide (`--cloud local` without the cloud extra)."""


@dataclass
class LinkStats:
    """Bytes of protocol frames on the link (msgpack frames as the WebSocket carries them, retries included; not
    the WebSocket's own 2-14 header bytes nor the hello) and answered round trips. A shared link keeps its totals;
    each request also gets its own, counting only that request's frames (see `CloudLink.extend`)."""

    bytes_up: int = 0
    bytes_down: int = 0
    round_trips: int = 0

    def add_frame(self, up: int = 0, down: int = 0) -> None:
        self.bytes_up += up
        self.bytes_down += down


class CloudLink(Protocol):
    codec: str
    deep_layers: int  # layers the cloud runs per position (N - K)
    stats: LinkStats  # everything this link carried

    async def open_session(self, session_id: str, stats: LinkStats | None = None) -> None: ...

    async def extend(self, request: ExtendRequest, stats: LinkStats | None = None) -> DeepResult:
        """Send layer-K states (and drafts) of positions request.start..; raises ContextMismatchError (re-upload
        from `have`), StaleRequestError (pipelined behind a rejected draft), CloudUnavailableError (fall back) or
        CloudRefusedError (fail). `stats`, when given, also counts this call's frames, so a request sharing the
        link with others knows its own traffic."""
        ...

    async def close_session(self, session_id: str, stats: LinkStats | None = None) -> None: ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class LocalLinkSpec:
    """What `--cloud local` needs to build the deep layers in this process (the cloud extra implements it).

    `loaded` may hold the already-loaded model for `model`, so edge export and in-process cloud share weights.
    """

    model: str
    exit_layer: int
    codec: str
    fingerprint: str  # the edge graph's model; the loaded model must be the same one
    executor: Executor
    kv_budget_bytes: int | None = None
    loaded: Any = None


def open_local_link(spec: LocalLinkSpec) -> CloudLink:
    """The in-process cloud, from the `offramp.cloud_links` entry point named `local` (the cloud extra)."""
    found = [ep for ep in entry_points(group=LINK_ENTRY_POINT_GROUP) if ep.name == LOCAL_LINK]
    if not found:
        raise LinkUnavailableError(
            f"--cloud {LOCAL_LINK} runs the deep layers in this process, which this install cannot do "
            f"(no {LOCAL_LINK!r} entry point in {LINK_ENTRY_POINT_GROUP!r}): {CLOUD_EXTRA_HINT}, or point --cloud at a ws:// cloud"
        )
    try:
        factory = found[0].load()
    except ImportError as exc:
        raise LinkUnavailableError(f"--cloud {LOCAL_LINK} needs {exc.name or 'the cloud packages'}: {CLOUD_EXTRA_HINT}") from exc
    return factory(spec)
