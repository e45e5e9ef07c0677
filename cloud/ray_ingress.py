"""The cloud's front door on Ray Serve: the single server's endpoints, with the work done by engine replicas.

- `/v1/edge`: the bearer token is checked at the upgrade (401 without a valid one, as the single server does),
  the hello by one engine replica; then every frame goes to the replica that holds its session
  (`handle.options(session_id=...)`, routed by `offramp.cloud.ray_router.SessionRouter`) and its reply back.
  One edge's sessions may live on different replicas. Frames of one session are forwarded one at a time, in
  arrival order (Serve does not promise to deliver two calls in the order they were made); other sessions' frames
  go concurrently and meet in their replica's batcher. A call to a replica that died is made again: the session
  hashes to a survivor now, which answers `Evicted` and the edge re-uploads from its layer-K log. Any other
  failure of a call is an `Error` frame the edge treats as an unanswered request (it falls back for it).
- `/healthz`: every replica's pid, sessions and KV bytes (`{"replicas": [{"pid": ..., "sessions": ...}], ...}`);
  200 while at least one replica answers.
- `/metrics`: every replica's metrics, labelled `replica="pid N"`.
- `/v1/completions`: run by one replica's own handler (see `EngineReplica.completions`).

This module needs Ray; the single-process server never imports it.
"""

# No `from __future__ import annotations`: FastAPI reads the handlers' parameter types (Request, WebSocket), and
# Serve pickles the handlers by value, where string annotations would not resolve.

import asyncio
import dataclasses
import logging
import uuid

import msgpack
import ray.exceptions
from ray import serve
from ray.serve import context as serve_context
from fastapi import FastAPI, Request, WebSocket
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.websockets import WebSocketDisconnect

from offramp.cloud.auth import BearerAuth
from offramp.cloud.completions import MAX_BODY_BYTES
from offramp.cloud.edge_connection import HELLO_TIMEOUT_S, MAX_INFLIGHT_PER_CONNECTION, _peek_id
from offramp.cloud.ray_metrics import merge_expositions
from offramp.cloud.ray_replicas import known_replicas
from offramp.cloud.ray_router import REPLICA_KEY, replica_key
from offramp.shared import protocol as p
from offramp.shared.version import __version__

log = logging.getLogger("offramp.cloud")

ENGINE = "EngineReplica"  # the engine deployment's name
DIED_RETRIES = 3  # calls made again after the replica they went to died
PROBE_TIMEOUT_S = 10.0
PER_REPLICA = ("pid", "node", "replica", "replica_id", "sessions", "kv_bytes", "connections", "session_opens", "deep_layer_tokens", "uptime_s", "status")

app = FastAPI(title="offramp cloud (Ray Serve)", docs_url=None, redoc_url=None, openapi_url=None)


def _error(request_id: int, code: str, message: str) -> bytes:
    return p.encode_frame(p.Error(request_id, code, message))


def _peek_session(data: bytes) -> str | None:
    """The session a frame names, if it names one (the replica validates the rest)."""
    try:
        raw = msgpack.unpackb(data, raw=False, max_bin_len=len(data))
    except Exception:
        return None
    value = raw.get("session") if isinstance(raw, dict) else None
    return value if isinstance(value, str) and value else None


def _json_error(status: int, message: str, code: str) -> JSONResponse:
    kind = "authentication_error" if status == 401 else "server_error" if status >= 500 else "invalid_request_error"
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}}, status_code=status)


def _own_request_id() -> None:
    """Give the calls this task makes an internal request id of their own. Serve hands every call made while a
    replica handles a request that request's id, and its router matches a placed call to its waiter by that id:
    two calls in flight at once under one WebSocket (frames of two sessions) or one probe fan-out would be
    mistaken for each other, and one of them would wait forever (seen here with Ray 2.60)."""
    ctx = serve_context._serve_request_context.get()
    if ctx is not None and ctx._internal_request_id:
        serve_context._serve_request_context.set(dataclasses.replace(ctx, _internal_request_id=""))


async def _send(ws: WebSocket, data: bytes) -> None:
    with _suppress():  # the edge went away; its sessions stay for a reconnect
        await ws.send_bytes(data)


async def _within(make_call, *args):
    """make_call(*args), awaited at most PROBE_TIMEOUT_S; None if it failed."""
    _own_request_id()
    try:
        return await asyncio.wait_for(make_call(*args), PROBE_TIMEOUT_S)
    except Exception as exc:
        log.info("probe of an engine replica failed: %s", exc.__class__.__name__)
        return None


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        return kind is not None and issubclass(kind, (WebSocketDisconnect, RuntimeError, ConnectionError))


# Decorated here, not where the deployment is built, so importing this module in a replica sets the routes up; Serve
# pickles the routes' methods by value at this point, so everything they use is defined above.
@serve.ingress(app)
class EdgeIngress:
    """The Ray Serve deployment's class (made a deployment by `offramp.cloud.ray_serve.build_app`)."""

    def __init__(self, engine, tokens: list[str] | None = None, metrics_require_token: bool = False,
                 max_frame_bytes: int = p.DEFAULT_MAX_FRAME_BYTES) -> None:
        self.engine = engine
        self.auth = BearerAuth(tokens)
        self.metrics_require_token = metrics_require_token
        self.max_frame_bytes = max_frame_bytes

    # -- /v1/edge --------------------------------------------------------------------------------------

    @app.websocket(p.EDGE_PATH)
    async def edge(self, ws: WebSocket) -> None:
        owner = self.auth.identity(ws.headers.get("authorization"))
        if owner is None:
            await ws.send_denial_response(_json_error(401, "missing or wrong bearer token (Authorization: Bearer <token>)", p.UNAUTHORIZED))
            return
        await ws.accept()
        conn_id = uuid.uuid4().hex
        try:
            if not await self._handshake(ws):
                return
            await self._serve_frames(ws, conn_id, owner)
        except WebSocketDisconnect:
            pass
        finally:
            with _suppress():
                await ws.close()

    async def _handshake(self, ws: WebSocket) -> bool:
        try:
            message = await asyncio.wait_for(ws.receive(), HELLO_TIMEOUT_S)
        except asyncio.TimeoutError:
            await self._refuse(ws, p.Error(0, p.NOT_HELLO, f"no hello within {HELLO_TIMEOUT_S:.0f} s"))
            return False
        data = message.get("bytes")
        if data is None:
            if message["type"] == "websocket.disconnect":
                return False
            await self._refuse(ws, p.Error(0, p.NOT_HELLO, "expected a binary hello frame, got text"))
            return False
        _own_request_id()
        reply = await self.engine.hello.remote(data)
        if isinstance(p.decode_frame(reply), p.Error):
            await ws.send_bytes(reply)
            await ws.close(code=1008)
            return False
        await ws.send_bytes(reply)
        return True

    async def _refuse(self, ws: WebSocket, error: p.Error) -> None:
        await ws.send_bytes(p.encode_frame(error))
        await ws.close(code=1008, reason=error.code[:100])

    async def _serve_frames(self, ws: WebSocket, conn_id: str, owner: str) -> None:
        locks: dict[str, list] = {}  # session -> [lock, frames waiting or running]
        tasks: set[asyncio.Task] = set()
        touched: set[str] = set()
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                data = message.get("bytes")
                if data is None:
                    await ws.send_bytes(_error(0, p.BAD_FRAME, "frames are binary msgpack, not text"))
                    continue
                if len(tasks) >= MAX_INFLIGHT_PER_CONNECTION:
                    await ws.send_bytes(_error(_peek_id(data), p.OVERLOADED, f"more than {MAX_INFLIGHT_PER_CONNECTION} requests in flight on this connection"))
                    continue
                task = asyncio.create_task(self._forward(ws, conn_id, owner, data, locks, touched))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
        finally:
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            # one detach per replica this connection used (sessions hash there), so their sessions count as abandoned
            await asyncio.gather(*(_within(self.engine.options(session_id=s).detach.remote, conn_id) for s in touched))

    async def _forward(self, ws: WebSocket, conn_id: str, owner: str, data: bytes, locks: dict, touched: set) -> None:
        _own_request_id()
        session = _peek_session(data)
        if session is not None and session.startswith(REPLICA_KEY):
            await _send(ws, _error(_peek_id(data), p.BAD_FRAME, f"session ids may not start with {REPLICA_KEY!r}"))
            return
        if session is None:  # not a session frame: any replica answers it with the single server's error
            reply = await self._call(None, conn_id, owner, data)
            await _send(ws, reply)
            return
        entry = locks.setdefault(session, [asyncio.Lock(), 0])
        entry[1] += 1
        try:
            async with entry[0]:  # taken before the first await: the session's frames go in arrival order
                reply = await self._call(session, conn_id, owner, data)
                touched.add(session)
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                locks.pop(session, None)
        await _send(ws, reply)

    async def _call(self, session: str | None, conn_id: str, owner: str, data: bytes) -> bytes:
        handle = self.engine.options(session_id=session) if session else self.engine
        for attempt in range(DIED_RETRIES + 1):
            try:
                return await handle.frame.remote(conn_id, owner, data)
            except ray.exceptions.ActorDiedError as exc:  # its sessions are gone with it: the next replica says Evicted
                log.warning("engine replica died under a frame (%s); calling again", exc.__class__.__name__)
                if attempt == DIED_RETRIES:
                    return _error(_peek_id(data), p.INTERNAL, "the engine replica died and none took over yet")
                await asyncio.sleep(0.05 * (attempt + 1))
            except Exception as exc:  # unknown whether it ran: the edge treats the request as unanswered
                log.warning("engine call failed: %s: %s", exc.__class__.__name__, exc)
                return _error(_peek_id(data), p.INTERNAL, f"engine replica unavailable: {exc.__class__.__name__}")
        raise AssertionError("unreachable")

    # -- probes ----------------------------------------------------------------------------------------

    async def _replicas(self, method: str) -> list:
        """Ask every engine replica (as this process's router knows them) `method`; failures are left out."""
        ids = known_replicas(ENGINE)
        if not ids:  # the router starts with the first call through the handle
            first = await _within(getattr(self.engine, method).remote)
            ids = known_replicas(ENGINE)
            if not ids:
                return [first] if first is not None else []
        answers = await asyncio.gather(*(_within(getattr(self.engine.options(session_id=replica_key(u)), method).remote) for u in ids))
        return [a for a in answers if a is not None]

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        infos = await self._replicas("health")
        if not infos:
            return JSONResponse({"status": "loading", "version": __version__, "protocol_version": p.PROTOCOL_VERSION, "replicas": []}, status_code=503)
        common = {k: v for k, v in infos[0].items() if k not in PER_REPLICA}
        replicas = [{k: info.get(k) for k in PER_REPLICA if k in info} for info in infos]
        body = {**common, "status": "ok", "auth": self.auth.enabled, "sessions": sum(i["sessions"] for i in infos),
                "kv_bytes": sum(i["kv_bytes"] for i in infos), "replicas": sorted(replicas, key=lambda r: r["pid"])}
        return JSONResponse(body)

    @app.get("/metrics")
    async def metrics(self, request: Request) -> Response:
        if self.metrics_require_token and self.auth.identity(request.headers.get("authorization")) is None:
            return _json_error(401, "missing or wrong bearer token (Authorization: Bearer <token>)", p.UNAUTHORIZED)
        pairs = await self._replicas("labelled_metrics")
        return Response(merge_expositions(dict(pairs)), media_type="text/plain; version=0.0.4; charset=utf-8")

    # -- /v1/completions -------------------------------------------------------------------------------

    @app.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        if self.auth.identity(request.headers.get("authorization")) is None:
            return _json_error(401, "missing or wrong bearer token (Authorization: Bearer <token>)", p.UNAUTHORIZED)
        body = await request.body()
        if len(body) > MAX_BODY_BYTES:
            return _json_error(413, f"request body over {MAX_BODY_BYTES} bytes", "request_too_large")
        stream = self.engine.options(stream=True).completions.remote(body)
        status, content_type = await stream.__anext__()
        if not content_type.startswith("text/event-stream"):
            return Response(b"".join([chunk async for chunk in stream]), status_code=status, media_type=content_type)
        return StreamingResponse(stream, status_code=status, media_type=content_type, headers={"Cache-Control": "no-cache"})
