"""The cloud server: edges over a WebSocket at /v1/edge, the cloud-only baseline, health and metrics.

    app = make_app(CloudState.load(CloudConfig(exit_layer=15)))   # or serve(config) for a process

One worker thread runs every forward pass (the deep engine for edge sessions, the whole-model engine for the
cloud-only endpoint) and every change to the session tables, so nothing in the engine needs locks; the event
loop only moves frames. SIGTERM drains: no new sessions, in-flight requests finish, then connections close.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSCloseCode, web

from offramp.cloud.auth import BearerAuth, check_bind, read_tokens
from offramp.cloud.batcher import Batcher
from offramp.cloud.completions import MAX_BODY_BYTES, error_response, handle_completions
from offramp.cloud.config import CloudConfig
from offramp.cloud.context import ContextManager, SessionContext, SessionLimitError
from offramp.cloud.edge_connection import EdgeConnection
from offramp.cloud.engine import DeepEngine, device_for
from offramp.cloud.metrics import CloudMetrics
from offramp.shared import protocol as p
from offramp.shared.codecs import CODECS, CodecError, get_codec
from offramp.shared.tokens import stop_token_ids
from offramp.shared.version import __version__

log = logging.getLogger("offramp.cloud")

STATE: web.AppKey["ServerSlot"] = web.AppKey("state")
OWNER = web.RequestKey("owner", str)
DRAIN_TIMEOUT_S = 30.0


class DrainingError(SessionLimitError):
    code = p.DRAINING


@dataclass
class CloudState:
    """Everything the handlers share: model, engines, batchers, the session table, auth, metrics."""

    config: CloudConfig
    model: Any
    tokenizer: Any
    fingerprint: str
    auth: BearerAuth
    model_name: str = "default"
    metrics: CloudMetrics = field(default_factory=CloudMetrics)
    draining: bool = False
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        from offramp.models.split import CloudPart

        cfg = self.config
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="offramp-cloud")
        # One table and one budget for edge sessions and cloud-only completions alike.
        self.contexts = ContextManager(cfg.kv_budget_bytes, cfg.session_ttl_s, cfg.max_sessions)
        self.contexts.on_evict = self._on_evict
        if cfg.load_in_8bit:
            from offramp.cloud.int8_weights import quantize_linear_layers

            quantize_linear_layers(self.model.model.layers, device_for(cfg.device))
        self.engine = DeepEngine(CloudPart(self.model, cfg.exit_layer), self.contexts, device=cfg.device)
        full = CloudPart(self.model, 0, whole_model=True)
        self.full_engine = DeepEngine(full, self.contexts, device=cfg.device)
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
        self._loop: asyncio.AbstractEventLoop | None = None
        self.connections: set[EdgeConnection] = set()
        self.completions_inflight = 0

    @classmethod
    def load(cls, config: CloudConfig) -> "CloudState":
        """Load the model named in the config, read the client tokens, refuse an unsafe bind."""
        tokens = read_tokens(config.token_file)
        check_bind(config.host, tokens)
        return _load_state(config, BearerAuth(tokens))

    # -- handshake -------------------------------------------------------------------------------------

    def check_hello(self, hello: p.Hello) -> tuple[str, str] | None:
        """None if the edge may talk to us, else (error code, message)."""
        if hello.version != p.PROTOCOL_VERSION:
            return p.VERSION_MISMATCH, f"edge speaks protocol version {hello.version}, this cloud speaks {p.PROTOCOL_VERSION}; upgrade the older side"
        if hello.fingerprint != self.fingerprint:
            return p.MODEL_MISMATCH, f"edge model fingerprint {hello.fingerprint[:16]}... is not this cloud's model ({self.fingerprint[:16]}...)"
        if hello.exit_layer != self.config.exit_layer:
            return p.MODEL_MISMATCH, f"edge exits at layer {hello.exit_layer}, this cloud continues from layer {self.config.exit_layer}"
        if hello.hidden_size != self.hidden_size:
            return p.MODEL_MISMATCH, f"edge hidden size {hello.hidden_size} is not this model's {self.hidden_size}"
        return None

    def welcome(self) -> p.Welcome:
        return p.Welcome(p.PROTOCOL_VERSION, f"offramp {__version__}", self.deep_layers, self.max_positions, self.codecs,
                         self.config.max_frame_bytes, self.replica)

    @property
    def replica(self) -> str:
        return f"pid {os.getpid()}"

    # -- sessions --------------------------------------------------------------------------------------

    def open_session(self, session: str, owner: str, codec: str, conn: EdgeConnection) -> SessionContext:
        """Open (or re-open) a session in the one table; runs on the event loop, before any await of its frame."""
        get_codec(codec)
        if codec not in self.codecs:
            raise CodecError(f"codec {codec!r} is not served here; served: {self.codecs}")
        if self.draining and self.contexts.peek(session) is None:
            raise DrainingError("the cloud is shutting down and takes no new sessions")
        ctx = self.contexts.open(session, owner, codec, conn, per_owner_limit=self.config.max_sessions_per_client,
                                 evictable=self._abandoned)
        self._update_gauges()
        return ctx

    def close_session(self, session: str, owner: str) -> None:
        self.contexts.close(session, owner)
        self._update_gauges()

    def _abandoned(self, ctx: SessionContext) -> bool:
        """A session whose last connection is gone (a crashed edge, a generation that ended with the link down)."""
        return ctx.connection is not None and ctx.connection not in self.connections

    async def run_serial(self, fn: Callable, *args: Any) -> Any:
        """Run fn on the engine's worker thread, after any forward pass in progress."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def _on_evict(self, ctx: SessionContext, reason: str) -> None:
        """Called on whichever thread evicted: count it and tell the owning edge (it re-uploads when it next needs us)."""
        self.metrics.evictions.labels(reason).inc()
        conn = ctx.connection
        if conn is not None and conn in self.connections and self._loop is not None:
            frame = p.Evicted(0, ctx.session_id, 0, 0, reason)
            self._loop.call_soon_threadsafe(lambda: asyncio.ensure_future(conn.send(frame)))

    def _batch_observer(self, engine: str) -> Callable[[int, float], None]:
        def observe(size: int, seconds: float) -> None:
            self.metrics.batch_size.labels(engine).observe(size)
            self.metrics.forward_seconds.labels(engine).observe(seconds)

        return observe

    def _update_gauges(self) -> None:
        self.metrics.sessions.set(len(self.contexts))
        self.metrics.kv_bytes.set(self.contexts.nbytes)

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
            "sessions": len(self.contexts),
            "kv_bytes": self.contexts.nbytes,
            "kv_budget_bytes": self.config.kv_budget_bytes,
            "auth": self.auth.enabled,
            "replica": self.replica,
            "uptime_s": round(time.time() - self.started, 1),
        }

    async def aclose(self) -> None:
        await self.batcher.aclose()
        await self.full_batcher.aclose()
        self.executor.shutdown(wait=True)


# -- the aiohttp application ---------------------------------------------------------------------------


@dataclass
class ServerSlot:
    """What the app holds: auth (known before the model loads) and the state once it has loaded."""

    auth: BearerAuth
    state: CloudState | None = None
    metrics_require_token: bool = False


def loaded(request: web.Request) -> CloudState:
    """The loaded state, or a 503 while the model is still loading."""
    state = request.app[STATE].state
    if state is None:
        raise web.HTTPServiceUnavailable(text=json.dumps({"status": "loading", "error": {"message": "the cloud is loading its model", "type": "server_error", "param": None, "code": "loading"}}),
                                         content_type="application/json")
    return state


@web.middleware
async def auth_middleware(request: web.Request, handler: Callable) -> web.StreamResponse:
    slot = request.app[STATE]
    if request.path == "/healthz" or (request.path == "/metrics" and not slot.metrics_require_token):
        return await handler(request)
    owner = slot.auth.identity(request.headers.get("Authorization"))
    if owner is None:
        if slot.state is not None:
            slot.state.metrics.errors.labels(p.UNAUTHORIZED).inc()
        return error_response(401, "missing or wrong bearer token (Authorization: Bearer <token>)", p.UNAUTHORIZED)
    request[OWNER] = owner
    return await handler(request)


async def handle_edge(request: web.Request) -> web.StreamResponse:
    state = loaded(request)
    ws = web.WebSocketResponse(max_msg_size=state.config.max_frame_bytes + (1 << 16), heartbeat=30.0)
    await ws.prepare(request)
    conn = EdgeConnection(state, ws, request[OWNER])
    state.connections.add(conn)
    state.metrics.connections.inc()
    try:
        await conn.run()
    finally:
        state.connections.discard(conn)  # its sessions stay (a reconnecting edge resumes them) until evicted
        state.metrics.connections.dec()
    return ws


async def handle_health(request: web.Request) -> web.Response:
    """Liveness and readiness: 200 when serving, 503 while loading or draining. No secrets in it."""
    state = request.app[STATE].state
    if state is None:
        return web.json_response({"status": "loading", "version": __version__, "protocol_version": p.PROTOCOL_VERSION}, status=503)
    return web.json_response(state.health(), status=503 if state.draining else 200)


async def handle_metrics(request: web.Request) -> web.Response:
    state = loaded(request)
    state._update_gauges()
    return web.Response(body=state.metrics.render(), content_type="text/plain", charset="utf-8")


def make_app(state: CloudState | None = None, auth: BearerAuth | None = None, metrics_require_token: bool | None = None) -> web.Application:
    """The aiohttp app, around a loaded CloudState (tests start it on a random port) or, with only `auth`, empty
    until `install_state` (the server binds first and answers 503 while it loads)."""
    if state is None and auth is None:
        raise ValueError("make_app needs a loaded state or the auth to use while loading")
    require = metrics_require_token if metrics_require_token is not None else (state.config.metrics_require_token if state else False)
    slot = ServerSlot(auth or state.auth, None, require)  # type: ignore[union-attr]
    app = web.Application(middlewares=[auth_middleware], client_max_size=MAX_BODY_BYTES)
    app[STATE] = slot
    app.router.add_get(p.EDGE_PATH, handle_edge)
    app.router.add_get("/healthz", handle_health)
    app.router.add_get("/metrics", handle_metrics)
    app.router.add_post("/v1/completions", handle_completions)

    async def lifecycle(app: web.Application):
        if state is not None:
            install_state(app, state)
        yield
        if slot.state is not None:
            await slot.state.aclose()

    async def close_edges(app: web.Application) -> None:
        """On shutdown, before aiohttp waits for handlers: an edge's WebSocket never ends by itself, so a SIGTERM
        would otherwise wait out the whole shutdown timeout while an edge stays connected."""
        if slot.state is not None:
            await asyncio.gather(*(conn.ws.close(code=WSCloseCode.GOING_AWAY, message=b"cloud shutting down") for conn in list(slot.state.connections)))

    app.cleanup_ctx.append(lifecycle)
    app.on_shutdown.append(close_edges)
    return app


def install_state(app: web.Application, state: CloudState) -> None:
    """Make a loaded state live (on the app's running loop)."""
    state._loop = asyncio.get_running_loop()
    app[STATE].state = state


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
    """Bind, load the model (/healthz answers 503 meanwhile), serve until SIGTERM/SIGINT, then drain and exit cleanly."""
    tokens = read_tokens(config.token_file)
    check_bind(config.host, tokens)
    auth = BearerAuth(tokens)
    app = make_app(auth=auth, metrics_require_token=config.metrics_require_token)
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, ssl_context=ssl_context(config))
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # the real port when 0 was asked for
    scheme = "wss" if config.ssl_cert else "ws"
    print(f"offramp cloud listening on {scheme}://{config.host}:{port} (loading {config.model})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loading = loop.run_in_executor(None, _load_state, config, auth)
    await asyncio.wait([loading, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        print("offramp cloud: stopped while loading", flush=True)
        await runner.cleanup()
        return
    state = loading.result()
    install_state(app, state)
    print(f"offramp cloud serving {config.model} layers {config.exit_layer}..{state.model.config.num_hidden_layers - 1} "
          f"on {scheme}://{config.host}:{port}{p.EDGE_PATH} (auth {'on' if state.auth.enabled else 'off'}, device {state.engine.device})", flush=True)
    if ready is not None:
        ready(port)
    await stop.wait()
    print("offramp cloud: draining", flush=True)
    await drain(state)
    await runner.cleanup()
    print("offramp cloud: stopped", flush=True)


def _load_state(config: CloudConfig, auth: BearerAuth) -> CloudState:
    from offramp.models import load_model
    from offramp.models.fingerprint import model_fingerprint

    model, tokenizer = load_model(config.model)
    return CloudState(config, model, tokenizer, model_fingerprint(model), auth, model_name=config.model)
