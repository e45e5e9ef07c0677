"""The edge's WebSocket link to `offramp cloud serve`: a `CloudLink` the decode loop cannot tell from `--cloud local`.

One connection carries every session of this edge; requests carry ids and a reader task hands each reply to its
waiter, so concurrent generations (the daemon) share it. The link connects lazily, says hello with the edge
graph's model fingerprint and exit layer, and after a failure waits with exponential backoff before trying
again, so a dead cloud costs one fast `CloudUnavailableError` per escalation (the edge falls back), not a
connect timeout each time. One request answered late (`CloudTimeoutError`) falls back alone: the connection is
fine, so the link neither backs off nor counts as down for the requests sharing it. A refusal (wrong token, another
model or protocol version, a codec the cloud lacks, another client's session) is a `CloudRefusedError`, never a
fallback. A cloud that lost a session (evicted, restarted) answers `Evicted`; the link re-opens the session and
raises `ContextMismatchError`, and the decode loop re-uploads from what the cloud holds.

Bytes are counted per frame as sent and received (msgpack frame bytes, retries included): in the link's own
`stats`, and in the `stats` a caller passes for its request (`offramp.edge.link.LinkStats`).
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import numpy as np

from offramp.edge.link import REFUSAL_CODES, CloudRefusedError, CloudTimeoutError, CloudUnavailableError, LinkStats
from offramp.shared import protocol as p
from offramp.shared.contract import ContextMismatchError, DeepResult, ExtendRequest, StaleRequestError, extend_frame, from_result_frame
from offramp.shared.codecs import DEFAULT_CODEC, get_codec
from offramp.shared.errors import OfframpError


__all__ = ["CloudRefusedError", "LinkConfigError", "WebSocketCloudLink", "edge_url"]


def error_reply(code: str, message: str) -> Exception:
    """An Error frame as an exception: a refusal fails the request, anything else (busy, draining) falls back."""
    if code in REFUSAL_CODES:
        return CloudRefusedError(code, message)
    return CloudUnavailableError(f"cloud answered {code}: {message}")


class LinkConfigError(OfframpError, ValueError):
    """A cloud URL or edge identity the link cannot work with."""


def edge_url(url: str) -> str:
    """ws(s)://host:port[/v1/edge]; http(s) is accepted and mapped to ws(s)."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise LinkConfigError(f"cloud URL {url!r} must look like ws://HOST:PORT or wss://HOST:PORT")
    path = parts.path if parts.path not in ("", "/") else p.EDGE_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


class WebSocketCloudLink:
    """Implements `offramp.edge.link.CloudLink` over the wire protocol in `offramp.shared.protocol`."""

    def __init__(
        self,
        url: str,
        codec: str = DEFAULT_CODEC,
        manifest: dict[str, Any] | None = None,
        token: str | None = None,
        timeout_s: float = 10.0,
        connect_timeout_s: float = 5.0,
        verify_tls: bool = True,
        ca_file: str | None = None,
        backoff_s: tuple[float, float] = (0.25, 8.0),
        client_name: str = "offramp-edge",
    ) -> None:
        self.url = edge_url(url)
        self.codec = codec
        self._codec = get_codec(codec)
        if not manifest or not all(k in manifest for k in ("model_fingerprint", "exit_layer", "hidden_size")):
            raise LinkConfigError("the link needs the edge's identity: a manifest with model_fingerprint, exit_layer and hidden_size")
        self.fingerprint = str(manifest["model_fingerprint"])
        self.exit_layer = int(manifest["exit_layer"])
        self.hidden_size = int(manifest["hidden_size"])
        self.deep_layers = int(manifest.get("num_layers", self.exit_layer)) - self.exit_layer  # confirmed by welcome
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.backoff_s = backoff_s
        self.client_name = client_name
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._ssl = _ssl_context(verify_tls, ca_file) if self.url.startswith("wss://") else None
        self.stats = LinkStats()
        self.state = "idle"  # idle | up | down | closed
        self.last_error: str | None = None
        self.welcome: p.Welcome | None = None
        self.reconnects = 0
        self.pushed_evictions = 0
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._sessions: set[str] = set()  # sessions opened through this link (re-opened after a loss)
        self._http: aiohttp.ClientSession | None = None
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._reader: asyncio.Task | None = None
        self._connect_lock: asyncio.Lock | None = None
        self._failures = 0
        self._retry_at = 0.0
        self._last_frame_at = 0.0  # monotonic time of the last frame from the cloud

    def __repr__(self) -> str:  # no token here
        return f"WebSocketCloudLink({self.url!r}, codec={self.codec!r}, state={self.state!r})"

    # -- CloudLink ---------------------------------------------------------------------------------------

    async def open_session(self, session_id: str, stats: LinkStats | None = None) -> None:
        await self._request(p.Open(next(self._ids), session_id, self.codec), stats)
        self._sessions.add(session_id)

    async def extend(self, request: ExtendRequest, stats: LinkStats | None = None) -> DeepResult:
        frame = extend_frame(next(self._ids), request, self._codec.encode(np.asarray(request.hidden, dtype=np.float32)))
        reply = await self._request(frame, stats)
        if isinstance(reply, p.Evicted):
            if reply.have == 0:  # the cloud forgot the session itself: open it again before the re-upload
                await self._request(p.Open(next(self._ids), request.session_id, self.codec), stats)
            raise ContextMismatchError(request.session_id, request.start, reply.have, reply.epoch, reply.reason)
        if isinstance(reply, p.Stale):
            raise StaleRequestError(request.session_id, request.epoch, reply.epoch, reply.length)
        if not isinstance(reply, p.Result):
            raise CloudUnavailableError(f"the cloud answered an extend with a {reply.type} frame, not a result")
        return from_result_frame(reply)

    async def close_session(self, session_id: str, stats: LinkStats | None = None) -> None:
        self._sessions.discard(session_id)
        await self._request(p.Close(next(self._ids), session_id), stats)

    async def connect(self) -> None:
        """Connect and say hello now (start-up): raises CloudRefusedError for a refusal, CloudUnavailableError if unreachable."""
        await self._connected()

    async def aclose(self) -> None:
        self.state = "closed"
        await self._drop("link closed")
        if self._http is not None:
            await self._http.close()
            self._http = None

    # -- connection ----------------------------------------------------------------------------------------

    async def _request(self, frame: p.Frame, stats: LinkStats | None = None) -> p.Frame:
        """Send a frame and wait for its reply, at most timeout_s in all; count both frames in `stats` too.

        A connection that dies under the request (reset on the way, or a cloud that restarted while this edge sat
        idle, noticed only now) is tried once more on a fresh connection within the same deadline: every request
        may be repeated (uploads and escalations name their positions; open and close are idempotent). A cloud
        that is really gone fails that reconnect at once, and the edge falls back.
        """
        data = p.encode_frame(frame)
        counters = [self.stats] if stats is None or stats is self.stats else [self.stats, stats]
        deadline = time.monotonic() + self.timeout_s
        for last_try in (False, True):
            ws = await self._connected()
            future = asyncio.get_running_loop().create_future()
            self._pending[frame.id] = future
            sent_at = time.monotonic()
            try:
                await ws.send_bytes(data)
                for c in counters:
                    c.add_frame(up=len(data))
                reply, size = await asyncio.wait_for(future, max(0.0, deadline - time.monotonic()))
                for c in counters:
                    c.add_frame(down=size)
                break
            except asyncio.TimeoutError:
                message = f"no answer from the cloud within {self.timeout_s:g} s ({frame.type})"
                if self._last_frame_at > sent_at:  # other answers arrived meanwhile: the link is fine, only this one is late
                    raise CloudTimeoutError(message) from None
                self._back_off(message + "; the link carried nothing meanwhile")
                raise CloudUnavailableError(self.last_error) from None
            except CloudUnavailableError:  # the reader lost the connection while we waited (see _drop)
                if last_try or self.state == "closed":
                    raise
            except (ConnectionError, aiohttp.ClientError, RuntimeError) as exc:
                await self._drop(f"send failed: {exc}")
                if last_try:
                    raise CloudUnavailableError(self.last_error) from exc
            finally:
                self._pending.pop(frame.id, None)
        for c in counters:
            c.round_trips += 1
        self._failures = 0
        if isinstance(reply, p.Error):
            raise error_reply(reply.code, reply.message)
        return reply

    async def _connected(self) -> aiohttp.ClientWebSocketResponse:
        if self.state == "closed":
            raise CloudUnavailableError("the link is closed")
        wait = self._retry_at - time.monotonic()
        if wait > 0:  # backing off after a failure: fall back now rather than wait for another one
            raise CloudUnavailableError(f"cloud unavailable ({self.last_error}); next try in {wait:.1f} s")
        if self._ws is not None and not self._ws.closed:
            return self._ws
        if self._connect_lock is None:
            self._connect_lock = asyncio.Lock()
        async with self._connect_lock:
            if self._ws is not None and not self._ws.closed:
                return self._ws
            try:
                return await self._connect()
            except CloudUnavailableError as exc:
                self._back_off(str(exc))
                raise

    async def _connect(self) -> aiohttp.ClientWebSocketResponse:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        max_msg = (self.welcome.max_frame_bytes if self.welcome else p.DEFAULT_MAX_FRAME_BYTES) + (1 << 16)
        try:
            ws = await asyncio.wait_for(
                self._http.ws_connect(self.url, headers=self._headers, ssl=self._ssl if self._ssl is not None else True,
                                      max_msg_size=max_msg, heartbeat=30.0, autoping=True),
                self.connect_timeout_s,
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status == 401:
                raise CloudRefusedError(p.UNAUTHORIZED, "the cloud wants a valid bearer token (--cloud-token-file, or $OFFRAMP_CLOUD_TOKEN)") from exc
            raise CloudUnavailableError(f"cannot open {self.url}: HTTP {exc.status}") from exc
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            raise CloudUnavailableError(f"cannot reach {self.url}: {type(exc).__name__}: {exc}".rstrip(": ")) from exc
        try:
            hello = p.Hello(p.PROTOCOL_VERSION, self.fingerprint, self.exit_layer, self.hidden_size, self.client_name)
            await ws.send_bytes(p.encode_frame(hello))
            msg = await ws.receive(timeout=self.connect_timeout_s)
            if msg.type != aiohttp.WSMsgType.BINARY:
                raise CloudUnavailableError(f"the cloud closed the link during hello ({msg.type.name})")
            reply = p.decode_frame(msg.data)
        except (asyncio.TimeoutError, aiohttp.ClientError, OSError, p.ProtocolError) as exc:
            await ws.close()
            raise CloudUnavailableError(f"hello with {self.url} failed: {type(exc).__name__}: {exc}") from exc
        except CloudUnavailableError:
            await ws.close()
            raise
        if isinstance(reply, p.Error):
            await ws.close()
            raise error_reply(reply.code, reply.message)
        if not isinstance(reply, p.Welcome) or reply.version != p.PROTOCOL_VERSION:
            await ws.close()
            raise CloudRefusedError(p.VERSION_MISMATCH, f"unexpected answer to hello: {reply}")
        if self.codec not in reply.codecs:
            await ws.close()
            raise CloudRefusedError("bad_codec", f"the cloud serves codecs {reply.codecs}, not {self.codec!r}")
        self.welcome, self.deep_layers = reply, reply.deep_layers
        self.reconnects += self.state in ("up", "down")
        self._ws, self.state, self._retry_at = ws, "up", 0.0
        self._reader = asyncio.create_task(self._read(ws))
        return ws

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        """Hand each reply to its waiter; on loss of the connection fail them all (they fall back)."""
        reason = "the cloud closed the link"
        try:
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.BINARY:
                    continue
                self._last_frame_at = time.monotonic()
                try:
                    frame = p.decode_frame(msg.data)
                except p.ProtocolError as exc:
                    reason = f"unreadable frame from the cloud: {exc}"
                    break
                rid = getattr(frame, "id", 0)
                future = self._pending.get(rid) if rid else None
                if future is not None and not future.done():
                    future.set_result((frame, len(msg.data)))  # the waiter counts it, for its request
                    continue
                self.stats.add_frame(down=len(msg.data))  # pushed frames belong to no request
                if isinstance(frame, p.Evicted):
                    self.pushed_evictions += 1  # the next request for it gets Evicted and re-uploads
                elif isinstance(frame, p.Error):
                    self.last_error = f"{frame.code}: {frame.message}"
        except (aiohttp.ClientError, ConnectionError) as exc:
            reason = f"link lost: {exc}"
        finally:
            if self._ws is ws:
                await self._drop(reason)

    async def _drop(self, reason: str) -> None:
        ws, self._ws = self._ws, None
        if self.state != "closed":
            self.state = "down"
            self._note_error(reason)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(CloudUnavailableError(reason))
        self._pending.clear()
        reader, self._reader = self._reader, None
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        if ws is not None and not ws.closed:
            await ws.close()

    def _note_error(self, message: str) -> None:
        self.last_error = message

    def _back_off(self, message: str) -> None:
        """After a failure, fall back at once for a while (doubling up to backoff_s[1]) before trying again."""
        self._failures += 1
        self._retry_at = time.monotonic() + min(self.backoff_s[1], self.backoff_s[0] * 2 ** (self._failures - 1))
        self._note_error(message)


def _ssl_context(verify: bool, ca_file: str | None) -> ssl.SSLContext | bool:
    if not verify:
        return False
    return ssl.create_default_context(cafile=ca_file) if ca_file else True
