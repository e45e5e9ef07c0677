"""One deep-engine replica of the cloud on Ray Serve: a whole `CloudState` (model, batcher, session table).

The ingress (`offramp.cloud.ray_ingress`) hands it one edge frame per call, routed by session id
(`offramp.cloud.ray_router`), and sends the reply bytes back to the edge. Frames are handled by the single
server's own `EdgeConnection` code (decoding, the per-session arrival-order lock, open/extend/close, every error
frame), so a replica answers exactly as `offramp cloud serve` does; only the socket is replaced by a per-call
reply slot. Concurrent calls meet in the replica's batcher as frames of one server's connections do.

Frames the cloud sends on its own (an eviction notice) have no call to ride on and are dropped: the edge learns
of the eviction from the `Evicted` answer to its next request, as it does after a reconnect.
"""

from __future__ import annotations

import asyncio
import contextvars
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web
from prometheus_client import Counter

from offramp.cloud.auth import BearerAuth
from offramp.cloud.config import CloudConfig
from offramp.cloud.edge_connection import EdgeConnection, hello_reply
from offramp.cloud.server import _load_state, install_state, make_app
from offramp.shared import protocol as p

_REPLY: contextvars.ContextVar[asyncio.Future] = contextvars.ContextVar("offramp_reply")


class ReplicaConnection(EdgeConnection):
    """An edge connection as one replica sees it through the ingress: no socket; each reply goes to its call."""

    def __init__(self, state, owner: str, opens: Counter) -> None:
        super().__init__(state, None, owner)  # type: ignore[arg-type]
        self.opens = opens

    async def _dispatch(self, frame: p.Frame) -> p.Frame:
        reply = await super()._dispatch(frame)
        if isinstance(reply, p.Opened):
            self.opens.inc()
        return reply

    async def answer(self, data: bytes) -> bytes:
        """Handle one frame as the single server does; return the reply it sends."""
        slot = asyncio.get_running_loop().create_future()
        token = _REPLY.set(slot)
        try:
            await self._handle(data)
        finally:
            _REPLY.reset(token)
        return slot.result()

    async def _send_data(self, data: bytes) -> None:
        slot = _REPLY.get(None)
        if slot is None or slot.done():
            return  # pushed (an eviction notice): no call to answer, see the module docstring
        self.state.metrics.bytes_out.inc(len(data))
        slot.set_result(data)


def _replica_id() -> str:
    """Ray Serve's id of this replica (what `offramp.cloud.ray_router.replica_key` routes to)."""
    from ray import serve

    return serve.get_replica_context().replica_id.unique_id


class EngineReplica:
    """The Ray Serve deployment's class (wrapped by `offramp.cloud.ray_serve.build_app`)."""

    def __init__(self, config: CloudConfig, threads: int | None = None) -> None:
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.state = _load_state(config, BearerAuth(None))  # the ingress checks tokens and passes the identity
        self.connections: dict[str, ReplicaConnection] = {}
        # a session opened on two replicas, or twice on one, was rebuilt: after a replica died, or moved by scaling
        self.opens = Counter("offramp_cloud_session_opens", "Open frames answered (a rebuilt session counts again)", registry=self.state.metrics.registry)
        self.started = time.time()
        self._site: str | None = None  # the replica's private loopback server for /v1/completions

    def _installed(self) -> None:
        if self.state._loop is None:
            self.state._loop = asyncio.get_running_loop()

    async def hello(self, data: bytes) -> bytes:
        """Welcome, or the Error refusing this edge (the ingress closes the socket after an Error)."""
        return p.encode_frame(hello_reply(self.state, data))

    async def frame(self, conn_id: str, owner: str, data: bytes) -> bytes:
        """One frame of the edge connection `conn_id`; returns the reply frame's bytes."""
        self._installed()
        conn = self.connections.get(conn_id)
        if conn is None or conn.owner != owner:
            conn = self.connections[conn_id] = ReplicaConnection(self.state, owner, self.opens)
            self.state.connections.add(conn)
            self.state.metrics.connections.inc()
        self.state.metrics.bytes_in.inc(len(data))
        return await conn.answer(data)

    async def detach(self, conn_id: str) -> None:
        """The edge connection closed: its sessions stay (a reconnecting edge resumes them) but count as abandoned."""
        conn = self.connections.pop(conn_id, None)
        if conn is not None:
            self.state.connections.discard(conn)
            self.state.metrics.connections.dec()

    async def health(self) -> dict:
        info = self.state.health()
        info.update(pid=os.getpid(), node=socket.gethostname(), replica_id=_replica_id(), connections=len(self.connections),
                    deep_layer_tokens=self.state.engine.layer_tokens, session_opens=int(self.opens._value.get()))
        return info

    async def labelled_metrics(self) -> tuple[str, str]:
        """(this replica's label, its Prometheus exposition)."""
        self.state._update_gauges()
        return self.state.replica, self.state.metrics.render().decode()

    async def completions(self, body: bytes) -> AsyncIterator[bytes | tuple[int, str]]:
        """POST /v1/completions (the ingress checked the client's token) through this replica's own server code, on
        a private loopback port: first (status, content type), then the body's chunks (SSE when streaming)."""
        url = await self._private_site()
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {self._secret}"}
        async with aiohttp.ClientSession() as http, http.post(url + "/v1/completions", data=body, headers=headers) as resp:
            yield resp.status, resp.headers.get("Content-Type", "application/json")
            async for chunk in resp.content.iter_any():
                yield chunk

    async def _private_site(self) -> str:
        if self._site is None:
            self._installed()
            self._secret = secrets.token_urlsafe(32)  # the port is reachable on this host: only this process knows it
            app = make_app(auth=BearerAuth(self._secret))
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            install_state(app, self.state)
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self._runner = runner
            self._site = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self._site
