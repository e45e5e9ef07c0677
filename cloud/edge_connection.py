"""One edge's WebSocket connection to the cloud: hello, then requests for many sessions, each answered by id.

Requests are handled concurrently (escalations of different sessions meet in the batcher), but those of one
session in arrival order: a per-session lock is taken before the first await of each handler, and asyncio
starts tasks in creation order. Every failure becomes an Error (or Evicted) frame; the connection stays up.

What each kind of bad input gets (codes from `offramp.shared.protocol`): undecodable or mistyped frames and
frames only the cloud sends -> `bad_frame`; over --max-frame-bytes -> `frame_too_large` (a frame so large the
WebSocket layer will not buffer it, over the limit + 64 KiB, closes the connection with close code 1009); an
unserved codec -> `bad_codec`; a payload that is not [rows, hidden] finite floats, or drives the deep layers to
non-finite logits -> `bad_hidden` (none of its rows enters the session's KV); positions past the context -> `bad_positions`;
another client's session -> `forbidden`; over a session limit -> `too_many_sessions`. An upload for a session
the cloud does not hold, or starting past what it holds, is not an error: `Evicted` says where to re-upload from.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

import msgpack
import numpy as np
from aiohttp import WSMsgType, web

from offramp.cloud.context import SessionOwnerError
from offramp.shared import protocol as p
from offramp.shared.codecs import CodecError, get_codec
from offramp.shared.contract import ContextMismatchError, ExtendRequest, SessionError, StaleRequestError
from offramp.shared.sampling import SamplingParams, SparseDistribution

if TYPE_CHECKING:
    from offramp.cloud.server import CloudState

log = logging.getLogger("offramp.cloud")

HELLO_TIMEOUT_S = 10.0
MAX_INFLIGHT_PER_CONNECTION = 256
_NO_LOCK = contextlib.nullcontext()


class EdgeConnection:
    def __init__(self, state: "CloudState", ws: web.WebSocketResponse, owner: str) -> None:
        self.state = state
        self.ws = ws
        self.owner = owner
        self.tasks: set[asyncio.Task] = set()

    async def run(self) -> None:
        if not await self._handshake():
            return
        async for msg in self.ws:
            if msg.type == WSMsgType.BINARY:
                self.state.metrics.bytes_in.inc(len(msg.data))
                if len(self.tasks) >= MAX_INFLIGHT_PER_CONNECTION:
                    await self.send_error(_peek_id(msg.data), p.OVERLOADED, f"more than {MAX_INFLIGHT_PER_CONNECTION} requests in flight on this connection")
                    continue
                task = asyncio.create_task(self._handle(msg.data))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
            elif msg.type == WSMsgType.TEXT:
                await self.send_error(0, p.BAD_FRAME, "frames are binary msgpack, not text")
            else:
                break
        if self.tasks:  # answers nobody will read, but the sessions' KV must stay consistent
            await asyncio.gather(*self.tasks, return_exceptions=True)

    async def _handshake(self) -> bool:
        try:
            msg = await self.ws.receive(timeout=HELLO_TIMEOUT_S)
        except asyncio.TimeoutError:
            await self._refuse(p.NOT_HELLO, f"no hello within {HELLO_TIMEOUT_S:.0f} s")
            return False
        if msg.type != WSMsgType.BINARY:
            await self._refuse(p.NOT_HELLO, f"expected a binary hello frame, got {msg.type.name}")
            return False
        reply = hello_reply(self.state, msg.data)
        if isinstance(reply, p.Error):
            await self._refuse(reply.code, reply.message)
            return False
        await self.send(reply)
        return True

    async def _refuse(self, code: str, message: str) -> None:
        await self.send_error(0, code, message)
        await self.ws.close(code=1008, message=code.encode()[:100])

    async def send(self, frame: p.Frame) -> None:
        await self._send_data(p.encode_frame(frame))

    async def _send_data(self, data: bytes) -> None:
        if self.ws.closed:
            return
        self.state.metrics.bytes_out.inc(len(data))
        try:
            await self.ws.send_bytes(data)
        except (ConnectionError, RuntimeError):  # the edge went away; its sessions stay for a reconnect
            pass

    async def send_error(self, request_id: int, code: str, message: str) -> None:
        self.state.metrics.errors.labels(code).inc()
        await self.send(p.Error(request_id, code, message))

    async def _handle(self, data: bytes) -> None:
        try:
            frame = p.decode_frame(data, self.state.config.max_frame_bytes)
        except p.ProtocolError as exc:
            await self.send_error(_peek_id(data), exc.code, str(exc))
            return
        session = getattr(frame, "session", None)
        if session is None or not hasattr(frame, "id"):
            await self.send_error(getattr(frame, "id", 0), p.BAD_FRAME, f"an edge does not send {frame.type} frames after hello")
            return
        if isinstance(frame, p.Open) and self.state.contexts.peek(session) is None:
            try:  # before any await: the frames of this session that arrived after it must queue behind it
                self.state.open_session(session, self.owner, frame.codec, self)
            except (SessionError, CodecError) as exc:
                code = exc.code if isinstance(exc, SessionError) else p.BAD_CODEC
                await self.send_error(frame.id, code, str(exc))
                return
        ctx = self.state.contexts.peek(session)
        lock = ctx.lock if ctx is not None else _NO_LOCK  # a session nobody holds needs no ordering: it is answered at once
        async with lock:
            try:
                reply = await self._dispatch(frame)
            except (SessionError, p.ProtocolError) as exc:
                await self.send_error(frame.id, exc.code, str(exc))
                return
            except CodecError as exc:
                await self.send_error(frame.id, p.BAD_CODEC if isinstance(frame, p.Open) else p.BAD_HIDDEN, str(exc))
                return
            except Exception as exc:  # a bug must not take the connection down; say so and keep serving
                log.exception("internal error on %s frame", frame.type)
                await self.send_error(frame.id, p.INTERNAL, f"{type(exc).__name__}: {exc}")
                return
            try:
                data = p.encode_frame(reply)  # checks our own reply too: a bug here is ours, not the edge's
            except p.ProtocolError as exc:
                log.exception("the cloud built an invalid %s frame", reply.type)
                await self.send_error(frame.id, p.INTERNAL, f"the cloud built an invalid reply: {exc}")
                return
        await self._send_data(data)

    async def _dispatch(self, frame: p.Frame) -> p.Frame:
        state = self.state
        if isinstance(frame, p.Open):
            ctx = state.open_session(frame.session, self.owner, frame.codec, self)
            return p.Opened(frame.id, frame.session, ctx.length, ctx.epoch)
        if isinstance(frame, p.Close):
            state.close_session(frame.session, self.owner)
            return p.Closed(frame.id, frame.session)
        if isinstance(frame, p.Extend):
            return await self._extend(frame)
        raise p.ProtocolError(f"an edge does not send {frame.type} frames")

    async def _extend(self, frame: p.Extend) -> p.Frame:
        state = self.state
        ctx = state.contexts.peek(frame.session)
        if ctx is None:
            return p.Evicted(frame.id, frame.session, 0, 0, "unknown session (never opened here, closed, evicted, or the cloud restarted)")
        if ctx.owner != self.owner:
            raise SessionOwnerError(f"session {frame.session!r} belongs to another client")
        ctx.connection = self
        hidden = get_codec(ctx.codec).decode(frame.payload, frame.rows, state.hidden_size)
        req = ExtendRequest(
            frame.session, frame.start, hidden, self.owner, frame.epoch, frame.want_token, list(frame.drafts),
            _draft_q(frame, state.vocab_size), SamplingParams(frame.temperature, frame.top_p), frame.seed,
            frame.top_logprobs, frame.rebase, frame.base_epoch,
        )
        try:
            result = await state.batcher.submit(req)
        except ContextMismatchError as exc:
            return p.Evicted(frame.id, frame.session, exc.have, exc.epoch, exc.reason or "the cloud lacks earlier positions of this session")
        except StaleRequestError as exc:
            state.metrics.stale.inc()
            return p.Stale(frame.id, frame.session, exc.epoch, exc.length)
        (state.metrics.escalations if frame.want_token or frame.drafts else state.metrics.uploads).inc()
        state.metrics.positions.labels("verify" if frame.drafts else "escalate" if frame.want_token else "upload").inc(frame.rows)
        state.metrics.drafts.labels("accepted").inc(result.accepted)
        state.metrics.drafts.labels("rejected").inc(len(frame.drafts) - result.accepted)
        return p.Result(frame.id, frame.session, result.epoch, result.start, result.predicted, result.logprobs, result.accepted,
                        result.token, result.length, result.token_logprobs, result.top_ids, result.top_logprobs)


def hello_reply(state: "CloudState", data: bytes) -> p.Frame:
    """The answer to an edge's first frame: Welcome, or the Error that refuses it (then the connection closes)."""
    try:
        hello = p.decode_frame(data, state.config.max_frame_bytes)
    except p.ProtocolError as exc:
        return p.Error(0, exc.code, str(exc))
    if not isinstance(hello, p.Hello):
        return p.Error(0, p.NOT_HELLO, f"the first frame must be hello, got {hello.type}")
    problem = state.check_hello(hello)
    return state.welcome() if problem is None else p.Error(0, *problem)


def _draft_q(frame: p.Extend, vocab_size: int) -> list[SparseDistribution] | None:
    """The sampled drafts' sparse distributions, checked: ids in the vocabulary, probabilities that sum to 1."""
    if frame.temperature == 0 or not frame.drafts:
        return None
    k = frame.q_support
    ids = np.frombuffer(frame.q_ids, dtype="<i4").reshape(len(frame.drafts), k).astype(np.int64)
    probs = np.frombuffer(frame.q_probs, dtype="<f4").reshape(len(frame.drafts), k).astype(np.float64)
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise p.ProtocolError(f"extend: draft distribution ids must be in 0..{vocab_size - 1}")
    if not np.isfinite(probs).all() or probs.min() < 0 or np.abs(probs.sum(axis=1) - 1).max() > 1e-3:
        raise p.ProtocolError("extend: each draft distribution must be finite, non-negative and sum to 1")
    return [SparseDistribution(i, q / q.sum()) for i, q in zip(ids, probs)]


def _peek_id(data: bytes) -> int:
    """The request id of a frame that failed validation, when it can be read at all (else 0)."""
    try:
        raw = msgpack.unpackb(data, raw=False, max_bin_len=len(data))
        value = raw.get("id") if isinstance(raw, dict) else None
    except Exception:
        return 0
    return value if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= p.MAX_ID else 0

