"""The edge<->cloud wire protocol: msgpack frames over a WebSocket, versioned, validated in one place.

Every frame is a msgpack map with a `type` key and the fields of one dataclass below. `decode_frame` checks
types, ranges and sizes, so a bad frame fails here with one kind of error (`ProtocolError`, carrying an error
`code`) and the server answers it with an `Error` frame instead of falling over deep inside.

A connection starts with `Hello` (edge) / `Welcome` (cloud). Requests carry an `id` the reply echoes, so many
sessions share one connection. `Extend` carries the layer-K states of a run of positions, optionally edge drafts
to verify and whether the cloud should pick the next token (see `offramp.shared.contract`). Replies: `Opened`,
`Closed`, `Result` (deep predictions at each row, accepted drafts, the cloud's token), `Stale` (the request was
pipelined behind a draft the cloud rejected: nothing computed), `Evicted` (the cloud lacks the session's context
from `have` on, or holds it at another epoch: re-upload from a prefix both agree on) and `Error`.

Version 2 added epochs, draft verification (greedy and speculative sampling), `Stale`, `rebase` and per-token
log-probs. Version 3 (this one) adds `Extend.base_epoch`: a rebase names the epoch of the copy it was computed
against, so a session that moved between replicas and came back is never resumed on a copy the rebase did not
account for; an older edge is refused with `version_mismatch`.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, ClassVar

import msgpack

from offramp.shared.errors import OfframpError

PROTOCOL_VERSION = 3
EDGE_PATH = "/v1/edge"
DEFAULT_MAX_FRAME_BYTES = 16 << 20
MAX_SESSION_ID = 128
MAX_ID = (1 << 63) - 1
MAX_TOP_K = 20  # top_logprobs per token, at most
MAX_DRAFT_SUPPORT = 256  # tokens of a sparse draft distribution, at most

# Error codes (the `code` of an Error frame). Every refusal carries one of these; ERROR_CODES lists them all.
BAD_FRAME = "bad_frame"  # not msgpack, not a map, unknown type or field, a field of the wrong type or range
VERSION_MISMATCH = "version_mismatch"  # hello: another protocol version
MODEL_MISMATCH = "model_mismatch"  # hello: another model fingerprint, exit layer or hidden size
NOT_HELLO = "hello_required"  # the first frame was not a hello (or none came in time)
UNAUTHORIZED = "unauthorized"  # missing or wrong bearer token (HTTP 401 before the upgrade)
FRAME_TOO_LARGE = "frame_too_large"  # over the server's --max-frame-bytes
BAD_CODEC = "bad_codec"  # open: a hidden-state codec the cloud does not serve
BAD_HIDDEN = "bad_hidden"  # a payload that does not decode to [rows, hidden] finite floats, or yields non-finite logits
BAD_POSITIONS = "bad_positions"  # positions outside 0..max_positions-1
UNKNOWN_SESSION = "unknown_session"
CONTEXT_MISSING = "context_missing"  # positions from `start` but the cloud holds fewer (answered as Evicted)
FORBIDDEN = "forbidden"  # the session belongs to another client (token)
TOO_MANY_SESSIONS = "too_many_sessions"  # the per-client or total session limit
DRAINING = "draining"  # the cloud is shutting down and takes no new sessions
OVERLOADED = "overloaded"  # too many requests in flight on one connection
INTERNAL = "internal"  # a bug; the connection stays up
STALE = "stale"  # not an error: the kind of a Stale reply (metrics label)
ERROR_CODES = frozenset({
    BAD_FRAME, VERSION_MISMATCH, MODEL_MISMATCH, NOT_HELLO, UNAUTHORIZED, FRAME_TOO_LARGE, BAD_CODEC, BAD_HIDDEN,
    BAD_POSITIONS, UNKNOWN_SESSION, CONTEXT_MISSING, FORBIDDEN, TOO_MANY_SESSIONS, DRAINING, OVERLOADED, INTERNAL,
})


class ProtocolError(OfframpError, ValueError):
    """A frame that is not valid in this protocol version; `code` goes into the Error frame."""

    def __init__(self, message: str, code: str = BAD_FRAME) -> None:
        super().__init__(message)
        self.code = code


class RemoteError(OfframpError):
    """The peer answered with an Error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class Frame:
    type: ClassVar[str] = ""

    def validate(self) -> None:
        """Range checks beyond types; subclasses extend."""


@dataclass
class Hello(Frame):
    type: ClassVar[str] = "hello"
    version: int
    fingerprint: str
    exit_layer: int
    hidden_size: int
    client: str = ""


@dataclass
class Welcome(Frame):
    type: ClassVar[str] = "welcome"
    version: int
    server: str
    deep_layers: int
    max_positions: int
    codecs: list[str]
    max_frame_bytes: int
    replica: str = ""  # which cloud process answered (several replicas behind one address)


@dataclass
class Open(Frame):
    type: ClassVar[str] = "open"
    id: int
    session: str
    codec: str


@dataclass
class Opened(Frame):
    type: ClassVar[str] = "opened"
    id: int
    session: str
    length: int
    epoch: int = 0


@dataclass
class Close(Frame):
    type: ClassVar[str] = "close"
    id: int
    session: str


@dataclass
class Closed(Frame):
    type: ClassVar[str] = "closed"
    id: int
    session: str


@dataclass
class Extend(Frame):
    """Layer-K states of positions start..start+rows-1, drafts to verify, and whether the cloud picks a token.

    `drafts[j]` is the edge's token for the position predicted by row rows - len(drafts) - want_token + j.
    Sampled drafts carry the edge's sparse q: `q_ids` (int32) and `q_probs` (float32), `q_support` entries per draft.
    Randomness for position i is `position_uniforms(seed, i)` on both sides.
    """

    type: ClassVar[str] = "extend"
    id: int
    session: str
    epoch: int
    start: int
    rows: int
    payload: bytes
    want_token: bool = True
    drafts: list[int] = field(default_factory=list)
    q_support: int = 0
    q_ids: bytes = b""
    q_probs: bytes = b""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    top_logprobs: int = 0
    rebase: bool = False
    base_epoch: int = 0  # with rebase: the epoch of the copy `start` was computed against (only that copy takes it)

    def validate(self) -> None:
        if len(self.drafts) + int(self.want_token) > self.rows:
            raise ProtocolError(f"extend: {len(self.drafts)} drafts{' and a pick' if self.want_token else ''} need more than {self.rows} rows")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ProtocolError(f"extend: temperature must be finite and >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ProtocolError(f"extend: top_p must be in (0, 1], got {self.top_p}")
        if self.top_logprobs > MAX_TOP_K:
            raise ProtocolError(f"extend: top_logprobs must be <= {MAX_TOP_K}, got {self.top_logprobs}")
        if self.q_support > MAX_DRAFT_SUPPORT:
            raise ProtocolError(f"extend: q_support must be <= {MAX_DRAFT_SUPPORT}, got {self.q_support}")
        if any(d < 0 for d in self.drafts):
            raise ProtocolError(f"extend: draft tokens must be >= 0, got {min(self.drafts)}")
        sampled = self.temperature > 0 and bool(self.drafts)
        want = 4 * len(self.drafts) * self.q_support
        if sampled and (self.q_support < 1 or len(self.q_ids) != want or len(self.q_probs) != want):
            raise ProtocolError(f"extend: sampled drafts need q_support >= 1 and {want}-byte q_ids and q_probs, "
                                f"got q_support {self.q_support}, {len(self.q_ids)} and {len(self.q_probs)} bytes")
        if not sampled and (self.q_ids or self.q_probs):
            raise ProtocolError("extend: q_ids/q_probs are only for sampled drafts (temperature > 0)")


@dataclass
class Result(Frame):
    """The full model's argmax and its log-prob at each row; the verification's outcome; the cloud's token."""

    type: ClassVar[str] = "result"
    id: int
    session: str
    epoch: int
    start: int
    predicted: list[int]
    logprobs: list[float]
    accepted: int
    token: int | None
    length: int
    token_logprobs: list[float] = field(default_factory=list)
    top_ids: list[list[int]] = field(default_factory=list)
    top_logprobs: list[list[float]] = field(default_factory=list)


@dataclass
class Stale(Frame):
    """The request's epoch is older than the session's: it followed a rejected draft, so nothing was computed."""

    type: ClassVar[str] = "stale"
    id: int
    session: str
    epoch: int
    length: int


@dataclass
class Evicted(Frame):
    """The cloud holds only `have` positions of the session, at `epoch` (evicted, expired, restarted, or last
    extended at another epoch): re-upload from a prefix both sides agree on."""

    type: ClassVar[str] = "evicted"
    id: int
    session: str
    have: int
    epoch: int = 0
    reason: str = ""


@dataclass
class Error(Frame):
    type: ClassVar[str] = "error"
    id: int
    code: str
    message: str


FRAME_TYPES: dict[str, type[Frame]] = {
    cls.type: cls for cls in (Hello, Welcome, Open, Opened, Close, Closed, Extend, Result, Stale, Evicted, Error)
}
_HINTS = {cls: typing.get_type_hints(cls) for cls in FRAME_TYPES.values()}


def encode_frame(frame: Frame) -> bytes:
    """Validate and pack; the `type` key comes first so a reader can dispatch before looking further."""
    _check_fields(frame)
    frame.validate()
    return msgpack.packb({"type": frame.type, **asdict(frame)}, use_bin_type=True)


def decode_frame(data: bytes, max_bytes: int = DEFAULT_MAX_FRAME_BYTES) -> Frame:
    """Unpack and validate one frame; anything off raises ProtocolError naming the bad part."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"frames are binary msgpack, got {type(data).__name__}")
    if len(data) > max_bytes:
        raise ProtocolError(f"frame of {len(data)} bytes exceeds the limit of {max_bytes}", FRAME_TOO_LARGE)
    try:
        raw = msgpack.unpackb(data, raw=False, strict_map_key=True, max_bin_len=max_bytes, max_str_len=1 << 16,
                              max_array_len=1 << 20, max_map_len=64)
    except Exception as exc:  # msgpack raises a zoo of types (ExtraData, FormatError, ValueError, ...)
        raise ProtocolError(f"not a msgpack frame: {type(exc).__name__}: {exc}") from None
    if not isinstance(raw, dict):
        raise ProtocolError(f"a frame is a msgpack map, got {type(raw).__name__}")
    kind = raw.pop("type", None)
    cls = FRAME_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise ProtocolError(f"unknown frame type {kind!r}; known: {sorted(FRAME_TYPES)}")
    names = {f.name for f in fields(cls)}
    unknown = set(raw) - names
    if unknown:
        raise ProtocolError(f"{kind}: unknown fields {sorted(map(str, unknown))}")
    try:
        frame = cls(**raw)
    except TypeError as exc:
        missing = sorted(f.name for f in fields(cls) if f.name not in raw and f.default is MISSING and f.default_factory is MISSING)
        raise ProtocolError(f"{kind}: missing fields {missing}") from exc
    _check_fields(frame)
    frame.validate()
    return frame


def _check_fields(frame: Frame) -> None:
    for f in fields(frame):
        value = getattr(frame, f.name)
        hint = _HINTS[type(frame)][f.name]
        if not _matches(value, hint):
            raise ProtocolError(f"{frame.type}: field {f.name!r} must be {_describe(hint)}, got {type(value).__name__} {_short(value)}")
        if isinstance(value, int) and not isinstance(value, bool) and not (0 <= value <= MAX_ID) and f.name != "token":
            raise ProtocolError(f"{frame.type}: field {f.name!r} must be in 0..{MAX_ID}, got {value}")
        if f.name == "session" and not (1 <= len(value) <= MAX_SESSION_ID):
            raise ProtocolError(f"{frame.type}: session id must be 1..{MAX_SESSION_ID} characters, got {len(value)}")
    token = getattr(frame, "token", None)
    if token is not None and token < 0:
        raise ProtocolError(f"{frame.type}: token must be >= 0, got {token}")


def _matches(value: Any, hint: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return any(_matches(value, h) for h in typing.get_args(hint))
    if origin is list:
        (inner,) = typing.get_args(hint)
        return isinstance(value, list) and all(_matches(v, inner) for v in value)
    if hint is type(None):
        return value is None
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if hint is bytes:
        return isinstance(value, (bytes, bytearray))
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."

