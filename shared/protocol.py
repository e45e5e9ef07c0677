"""The edge<->cloud wire protocol: msgpack frames over a WebSocket, versioned, validated in one place.

Every frame is a msgpack map with a `type` key and the fields of one dataclass below. `decode_frame` checks
types, ranges and sizes, so a bad frame fails here with one kind of error (`ProtocolError`, carrying an error
`code`) and the server answers it with an `Error` frame instead of falling over deep inside.

A connection starts with `Hello` (edge) / `Welcome` (cloud). Requests carry an `id` the reply echoes, so many
sessions share one connection. Replies: `Opened`, `Closed`, `Result` (deep predictions at each uploaded
position, and the chosen token for an escalation), `Evicted` (the cloud lacks the session's context from
`have` on: re-upload from there) and `Error`.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import MISSING, asdict, dataclass, fields
from typing import Any, ClassVar

import msgpack

from offramp.shared.errors import OfframpError

PROTOCOL_VERSION = 1
EDGE_PATH = "/v1/edge"
DEFAULT_MAX_FRAME_BYTES = 16 << 20
MAX_SESSION_ID = 128
MAX_ID = (1 << 63) - 1
MAX_TOP_K = 20

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
class Upload(Frame):
    """Layer-K hidden states of positions start..start+rows-1 (tokens that exited at the edge)."""

    type: ClassVar[str] = "upload"
    id: int
    session: str
    start: int
    rows: int
    payload: bytes


@dataclass
class Escalate(Frame):
    """Like Upload, and the cloud picks the next token after the last position (`u`: the edge's uniform draw)."""

    type: ClassVar[str] = "escalate"
    id: int
    session: str
    start: int
    rows: int
    payload: bytes
    temperature: float = 0.0
    top_p: float = 1.0
    u: float = 0.0

    def validate(self) -> None:
        if self.rows < 1:
            raise ProtocolError(f"escalate: rows must be >= 1, got {self.rows}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ProtocolError(f"escalate: temperature must be finite and >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise ProtocolError(f"escalate: top_p must be in (0, 1], got {self.top_p}")
        if not (0 <= self.u < 1):
            raise ProtocolError(f"escalate: u must be in [0, 1), got {self.u}")


@dataclass
class Result(Frame):
    """The full model's argmax and its log-prob at each uploaded position; `token` for escalations."""

    type: ClassVar[str] = "result"
    id: int
    session: str
    start: int
    predicted: list[int]
    logprobs: list[float]
    token: int | None
    length: int


@dataclass
class Evicted(Frame):
    """The cloud holds only `have` positions of the session (evicted, expired, restarted): re-upload from there."""

    type: ClassVar[str] = "evicted"
    id: int
    session: str
    have: int
    reason: str = ""


@dataclass
class Error(Frame):
    type: ClassVar[str] = "error"
    id: int
    code: str
    message: str


FRAME_TYPES: dict[str, type[Frame]] = {
    cls.type: cls for cls in (Hello, Welcome, Open, Opened, Close, Closed, Upload, Escalate, Result, Evicted, Error)
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
        missing = sorted(f.name for f in fields(cls) if f.name not in raw and f.default is MISSING)
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

