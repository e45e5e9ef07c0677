"""The cloud server: edges over a WebSocket at /v1/edge, the cloud-only baseline, health and metrics.

    app = make_app(CloudState.load(CloudConfig(exit_layer=15)))   # or serve(config) for a process

One worker thread runs every forward pass (the deep engine for edge sessions, the whole-model engine for the
cloud-only endpoint) and every change to the session tables, so nothing in the engine needs locks; the event
loop only moves frames. SIGTERM drains: no new sessions, in-flight requests finish, then connections close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSCloseCode, web

from offramp.cloud.auth import BearerAuth, check_bind, read_tokens
from offramp.cloud.batcher import Batcher
from offramp.cloud.completions import MAX_BODY_BYTES, error_response, handle_completions
from offramp.cloud.config import CloudConfig
from offramp.cloud.context import ContextManager, SessionContext, SessionLimitError, SessionOwnerError
from offramp.cloud.edge_connection import EdgeConnection
from offramp.cloud.engine import DeepEngine, device_for
from offramp.cloud.metrics import CloudMetrics
from offramp.shared import protocol as p
from offramp.shared.codecs import CODECS
from offramp.shared.tokens import stop_token_ids
from offramp.shared.version import __version__

log = logging.getLogger("offramp.cloud")

STATE: web.AppKey["CloudState"] = web.AppKey("state")
OWNER = web.RequestKey("owner", str)
DRAIN_TIMEOUT_S = 30.0


class DrainingError(SessionLimitError):
    code = p.DRAINING


@dataclass
class CloudState:
    """Everything the handlers share: model, engines, batchers, session tables, auth, metrics."""

    config: CloudConfig
    model: Any
    tokenizer: Any
    fingerprint: str
    auth: BearerAuth
    model_name: str = "default"
    metrics: CloudMetrics = field(default_factory=CloudMetrics)
    session_codecs: dict[str, tuple[str, str]] = field(default_factory=dict)  # session -> (owner, codec)
    session_conn: dict[str, EdgeConnection] = field(default_factory=dict)
    draining: bool = False
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        from offramp.models.split import CloudPart

        cfg = self.config
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="offramp-cloud")
        contexts = ContextManager(cfg.kv_budget_bytes, cfg.session_ttl_s, cfg.max_sessions)
        contexts.on_evict = self._on_evict
        if cfg.load_in_8bit:
            from offramp.cloud.int8_weights import quantize_linear_layers

            quantize_linear_layers(self.model.model.layers, device_for(cfg.device))
        self.engine = DeepEngine(CloudPart(self.model, cfg.exit_layer), contexts, device=cfg.device)
        full = CloudPart(self.model, 0, whole_model=True)
        self.full_engine = DeepEngine(full, ContextManager(cfg.kv_budget_bytes, cfg.session_ttl_s), device=cfg.device)
        self.batcher = Batcher(self.engine, cfg.max_batch, cfg.batch_window_s, self.executor)
        self.full_batcher = Batcher(self.full_engine, cfg.max_batch, cfg.batch_window_s, self.executor)
        self.batcher.on_batch = self._batch_observer("deep")
        self.full_batcher.on_batch = self._batch_observer("full")
        self.embed_tokens = self.model.model.embed_tokens
        self.hidden_size = self.engine.hidden_size
        self.max_positions = self.engine.max_positions
        self.vocab_size = int(self.model.config.vocab_size)
        self.deep_layers = self.engine.cloud.num_layers
        self.codecs = sorted(CODECS)
        self.stop_ids = stop_token_ids(self.tokenizer) if self.tokenizer is not None else ()
        self._locks: dict[str, list] = {}  # session -> [lock, users]; only while someone holds or waits
        self._loop: asyncio.AbstractEventLoop | None = None
        self.connections: set[EdgeConnection] = set()
        self.completions_inflight = 0

    @classmethod
    def load(cls, config: CloudConfig) -> "CloudState":
        """Load the model named in the config, read the client tokens, refuse an unsafe bind."""
        from offramp.models import load_model
        from offramp.models.fingerprint import model_fingerprint

        tokens = read_tokens(config.token_file)
        check_bind(config.host, tokens)
        model, tokenizer = load_model(config.model)
        return cls(config, model, tokenizer, model_fingerprint(model), BearerAuth(tokens), model_name=config.model)

    # -- handshake -------------------------------------------------------------------------------------

    def check_hello(self, hello: p.Hello) -> tuple[str, str] | None:
        """None if the edge may talk to us, else (error code, message)."""
        if hello.version != p.PROTOCOL_VERSION:
            return p.VERSION_MISMATCH, f"edge speaks protocol version {hello.version}, this cloud speaks {p.PROTOCOL_VERSION}"
        if hello.fingerprint != self.fingerprint:
            return p.MODEL_MISMATCH, f"edge model fingerprint {hello.fingerprint[:16]}... is not this cloud's model ({self.fingerprint[:16]}...)"
        if hello.exit_layer != self.config.exit_layer:
            return p.MODEL_MISMATCH, f"edge exits at layer {hello.exit_layer}, this cloud continues from layer {self.config.exit_layer}"
        if hello.hidden_size != self.hidden_size:
            return p.MODEL_MISMATCH, f"edge hidden size {hello.hidden_size} is not this model's {self.hidden_size}"
        return None

    def welcome(self) -> p.Welcome:
        return p.Welcome(p.PROTOCOL_VERSION, f"offramp {__version__}", self.deep_layers, self.max_positions, self.codecs, self.config.max_frame_bytes)

    # -- sessions --------------------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def session_lock(self, session: str) -> AsyncIterator[None]:
        """Serialize one session's requests in arrival order; the lock lives only while it has users, so session
        ids that were never opened (a fuzzer, a confused edge) cost no memory once answered."""
        entry = self._locks.get(session)
        if entry is None:
            entry = self._locks[session] = [asyncio.Lock(), 0]
        entry[1] += 1
        try:
            async with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                del self._locks[session]

    def session_codec(self, session: str, owner: str) -> str | None:
        entry = self.session_codecs.get(session)
        if entry is None:
            return None
        if entry[0] != owner:
            raise SessionOwnerError(f"session {session!r} belongs to another client")
        return entry[1]

    async def open_session(self, session: str, owner: str, codec: str, conn: EdgeConnection) -> int:
        entry = self.session_codecs.get(session)
        if entry is not None and entry[0] != owner:
            raise SessionOwnerError(f"session {session!r} belongs to another client")
        if entry is None:
            if self.draining:
                raise DrainingError("the cloud is shutting down and takes no new sessions")
            mine = sum(1 for o, _ in self.session_codecs.values() if o == owner)
            if mine >= self.config.max_sessions_per_client:
                raise SessionLimitError(f"this client holds {mine} sessions, the per-client limit ({self.config.max_sessions_per_client})")
        ctx: SessionContext = await self.run_serial(self.engine.contexts.open, session, owner)
        self.session_codecs[session] = (owner, codec)
        self.session_conn[session] = conn
        self._update_gauges()
        return ctx.length

    async def close_session(self, session: str, owner: str) -> None:
        self.session_codec(session, owner)  # ownership check
        await self.run_serial(self.engine.contexts.close, session, owner)
        self.session_codecs.pop(session, None)
        self.session_conn.pop(session, None)
        self._update_gauges()

    async def run_serial(self, fn: Callable, *args: Any) -> Any:
        """Run fn on the engine's worker thread, after any forward pass in progress."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _on_evict(self, ctx: SessionContext, reason: str) -> None:
        """Called on the worker thread: count it and tell the owning edge (it re-uploads when it next needs us)."""
        self.metrics.evictions.labels(reason).inc()
        conn = self.session_conn.get(ctx.session_id)
        if conn is not None and self._loop is not None:
            frame = p.Evicted(0, ctx.session_id, 0, reason)
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(conn.send(frame)))

    def _batch_observer(self, engine: str) -> Callable[[int, float], None]:
        def observe(size: int, seconds: float) -> None:
            self.metrics.batch_size.labels(engine).observe(size)
            self.metrics.forward_seconds.labels(engine).observe(seconds)

        return observe

    def _update_gauges(self) -> None:
        self.metrics.sessions.set(len(self.engine.contexts))
        self.metrics.kv_bytes.set(self.engine.contexts.nbytes)

    def health(self) -> dict:
        dtype = str(self.engine.dtype).replace("torch.", "")
        return {
            "status": "draining" if self.draining else "ok",
            "version": __version__,
            "protocol_version": p.PROTOCOL_VERSION,
            "model": self.model_name,
            "fingerprint": self.fingerprint,
            "exit_layer": self.config.exit_layer,
            "deep_layers": self.deep_layers,
            "device": str(self.engine.device),
            "dtype": dtype,
            "weights": "int8 (bitsandbytes)" if self.config.load_in_8bit else dtype,
            "sessions": len(self.engine.contexts),
            "kv_bytes": self.engine.contexts.nbytes,
            "kv_budget_bytes": self.config.kv_budget_bytes,
            "auth": self.auth.enabled,
            "uptime_s": round(time.time() - self.started, 1),
        }

    async def aclose(self) -> None:
        await self.batcher.aclose()
        await self.full_batcher.aclose()
        self.executor.shutdown(wait=True)


# -- the aiohttp application ---------------------------------------------------------------------------


@web.middleware
async def auth_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    state = request.app[STATE]
    owner = state.auth.identity(request.headers.get("Authorization"))
    if owner is None:
        state.metrics.errors.labels(p.UNAUTHORIZED).inc()
        return error_response(401, "missing or wrong bearer token (Authorization: Bearer <token>)", p.UNAUTHORIZED)
    request[OWNER] = owner
    return await handler(request)


async def handle_edge(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    ws = web.WebSocketResponse(max_msg_size=state.config.max_frame_bytes + (1 << 16), heartbeat=30.0)
    await ws.prepare(request)
    conn = EdgeConnection(state, ws, request[OWNER])
    state.connections.add(conn)
    state.metrics.connections.inc()
    try:
        await conn.run()
    finally:
        state.connections.discard(conn)
        state.metrics.connections.dec()
        for session in [s for s, c in state.session_conn.items() if c is conn]:
            del state.session_conn[session]
    return ws


async def handle_health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(state.health(), status=503 if state.draining else 200)


async def handle_metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state._update_gauges()
    return web.Response(body=state.metrics.render(), content_type="text/plain", charset="utf-8")


def make_app(state: CloudState) -> web.Application:
    """The aiohttp app for one loaded CloudState (tests start it on a random port)."""
    app = web.Application(middlewares=[auth_middleware], client_max_size=MAX_BODY_BYTES)
    app[STATE] = state
    app.router.add_get(p.EDGE_PATH, handle_edge)
    app.router.add_get("/healthz", handle_health)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_post("/v1/completions", handle_completions)

    async def lifecycle(app: web.Application):
        state._loop = asyncio.get_running_loop()
        yield
        await state.aclose()

    async def close_edges(app: web.Application) -> None:
        """On shutdown, before aiohttp waits for handlers: an edge's WebSocket never ends by itself, so a SIGTERM
        would otherwise wait out the whole shutdown timeout while an edge stays connected."""
        await asyncio.gather(*(conn.ws.close(code=WSCloseCode.GOING_AWAY, message=b"cloud shutting down") for conn in list(state.connections)))

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(close_edges)
    return app


async def drain(state: CloudState, timeout_s: float = DRAIN_TIMEOUT_S) -> None:
    """Stop taking sessions; let the frames already received and the completions running finish."""
    state.draining = True
    deadline = time.monotonic() + timeout_s
    tasks = [t for conn in state.connections for t in conn.tasks]
    if tasks:
        await asyncio.wait(tasks, timeout=timeout_s)
    while state.completions_inflight and time.monotonic() < deadline:
        await asyncio.sleep(0.05)


def ssl_context(config: CloudConfig) -> ssl.SSLContext | None:
    if config.ssl_cert is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(config.ssl_cert), str(config.ssl_key) if config.ssl_key else None)
    return ctx


async def serve(config: CloudConfig, ready: Callable[[int], None] | None = None) -> None:
    """Run until SIGTERM/SIGINT, then drain and exit cleanly."""
    state = CloudState.load(config)
    runner = web.AppRunner(make_app(state), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, ssl_context=ssl_context(config))
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # the real port when 0 was asked for
    scheme = "wss" if config.ssl_cert else "ws"
    print(f"offramp cloud serving {config.model} layers {config.exit_layer}..{state.model.config.num_hidden_layers - 1} "
          f"on {scheme}://{config.host}:{port}{p.EDGE_PATH} (auth {'on' if state.auth.enabled else 'off'}, device {state.engine.device})", flush=True)
    if ready is not None:
        ready(port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print("offramp cloud: draining", flush=True)
    await drain(state)
    await runner.cleanup()
    print("offramp cloud: stopped", flush=True)
