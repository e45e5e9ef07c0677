"""`offramp edge serve`: the edge daemon, an OpenAI-compatible HTTP server over `EdgeService`.

Layers, as in vLLM: this module routes, authenticates, streams and counts; `openai_api` validates and shapes;
`service` generates. `make_app(config)` builds the aiohttp application so tests can run it on a random port.

    offramp edge serve --edge DIR --cloud none                                  # edge-standalone on 127.0.0.1:8710
    offramp edge serve --edge DIR --cloud ws://gpu-box:8720 --cloud-token-file ~/.offramp/cloud-token \
        --token-file ~/.offramp/edge-token --host 0.0.0.0

The daemon listens at once and loads its edge in the background: `/healthz` answers 503 (`loading`) until the
edge is ready and again while it drains on SIGTERM, so an orchestrator routes traffic only to a daemon that can
serve. `/healthz` and `/metrics` need no token (orchestrators and Prometheus scrape them; `--metrics-require-token`
closes /metrics) and hold no secrets.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from offramp.edge.decode_loop import CLOUD, EDGE, FALLBACK
from offramp.edge.openai_api import (
    APIError,
    ChunkShaper,
    Limits,
    LogprobShaper,
    chat_object,
    completion_object,
    logprob_sources,
    new_id,
    parse_chat,
    parse_completion,
    parse_json_body,
    resolve_max_tokens,
)
from offramp.edge.config import EdgeConfig
from offramp.edge.link import CloudRefusedError
from offramp.edge.runtime_pool import BusyError
from offramp.edge.service import EdgeService
from offramp.edge.text_stream import TextRequest, TextResult, TextStream
from offramp.edge.tokenizer import ChatTemplateError
from offramp.shared.auth import is_loopback
from offramp.shared.auth import read_token_file as read_token
from offramp.shared.errors import OfframpError
from offramp.shared.sampling import SamplingParams
from offramp.shared.version import __version__

log = logging.getLogger("offramp.edge.daemon")

DEFAULT_PORT = 8710
PROBE_ROUTES = frozenset({"/healthz", "/metrics"})  # answer without a token, so a supervisor and Prometheus can probe


class DaemonConfigError(OfframpError, ValueError):
    """A daemon setting that is unsafe or cannot work (a public bind without a token, a port in use); token files raise AuthConfigError."""


@dataclass(frozen=True)
class DaemonConfig:
    """Everything `offramp edge serve` takes; the engine part is shared with the SDK's LocalEngine."""

    engine: EdgeConfig = field(default_factory=EdgeConfig)
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    token_file: Path | None = None  # the token clients must send to this daemon (never the cloud's)
    metrics_require_token: bool = False  # /metrics behind the token too
    max_body_bytes: int = 1 << 20  # 1 MiB: a long prompt fits; beyond is 413
    max_tokens_limit: int = 4096
    default_max_tokens: int = 256
    served_model_name: str | None = None
    shutdown_timeout_s: float = 30.0  # SIGTERM: in-flight requests get this long to finish

    def __post_init__(self) -> None:
        if not is_loopback(self.host) and self.token_file is None:
            raise DaemonConfigError(
                f"binding to {self.host!r} exposes the daemon beyond this machine; pass --token-file with a bearer token"
            )
        if not 0 <= self.port <= 65535:
            raise DaemonConfigError(f"port {self.port} is not in 0..65535")
        if self.max_body_bytes < 1024:
            raise DaemonConfigError(f"max_body_bytes {self.max_body_bytes} is too small for any request")
        if not 1 <= self.default_max_tokens <= self.max_tokens_limit:
            raise DaemonConfigError(
                f"default_max_tokens {self.default_max_tokens} must be in 1..max_tokens_limit ({self.max_tokens_limit})"
            )

    @property
    def open_routes(self) -> frozenset[str]:
        return PROBE_ROUTES - {"/metrics"} if self.metrics_require_token else PROBE_ROUTES


class Metrics:
    """The daemon's Prometheus metrics, in a registry of its own (so several apps can live in one process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("offramp_edge_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.running = Gauge("offramp_edge_requests_running", "Generations in progress", registry=r)
        self.tokens = Counter("offramp_edge_generated_tokens", "Generated tokens by where they were decided", ["source"], registry=r)
        for source in (EDGE, CLOUD, FALLBACK):
            self.tokens.labels(source)
        self.prompt_tokens = Counter("offramp_edge_prompt_tokens", "Prompt tokens processed", registry=r)
        self.link_bytes = Counter("offramp_edge_link_bytes", "Hidden-state and token bytes on the cloud link", ["direction"], registry=r)
        for direction in ("up", "down"):
            self.link_bytes.labels(direction)
        self.ttft = Histogram(
            "offramp_edge_time_to_first_token_seconds",
            "Time from the request to its first token",
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.duration = Histogram(
            "offramp_edge_request_duration_seconds",
            "Generation wall time",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
            registry=r,
        )
        self.disconnects = Counter("offramp_edge_client_disconnects", "Clients that left before their generation ended", registry=r)
        self.sessions = Gauge("offramp_edge_sessions_active", "Edge sessions (runtimes) in use", registry=r)
        self.cloud_up = Gauge("offramp_edge_cloud_link_up", "1 if the last cloud call succeeded, 0 if it failed, -1 without a cloud", registry=r)

    def observe(self, result: TextResult) -> None:
        stats = result.stats
        self.prompt_tokens.inc(result.prompt_tokens)
        self.tokens.labels(EDGE).inc(stats.edge_exits)
        self.tokens.labels(CLOUD).inc(stats.escalations)
        self.tokens.labels(FALLBACK).inc(stats.fallback_tokens)
        self.link_bytes.labels("up").inc(stats.bytes_up)
        self.link_bytes.labels("down").inc(stats.bytes_down)
        if stats.tokens:
            self.ttft.observe(stats.ttft_s)
        self.duration.observe(stats.wall_s)


LOADING, READY, DRAINING, FAILED = "loading", "ready", "draining", "failed"


@dataclass
class DaemonState:
    """Where the daemon is in its life: loading its edge, serving, draining, or failed to load (and why)."""

    phase: str = LOADING
    service: EdgeService | None = None
    limits: Limits | None = None
    error: str | None = None
    loaded: asyncio.Event = field(default_factory=asyncio.Event)  # set once the load ended, either way

    def ready(self) -> tuple[EdgeService, Limits]:
        """The service, or a 503 saying why there is none yet (or any more)."""
        if self.phase == READY and self.service is not None and self.limits is not None:
            return self.service, self.limits
        reason = {LOADING: "the edge is still loading; retry shortly", DRAINING: "the daemon is shutting down",
                  FAILED: f"the edge failed to load: {self.error}"}.get(self.phase, self.phase)
        raise APIError(reason, status=503, type="server_error", code=self.phase)


CONFIG = web.AppKey("config", DaemonConfig)
STATE = web.AppKey("state", DaemonState)
METRICS = web.AppKey("metrics", Metrics)
TOKEN = web.AppKey("token", str)
STARTED = web.AppKey("started", int)

ServiceBuilder = Callable[[], EdgeService]


def make_app(
    config: DaemonConfig, service: EdgeService | None = None, *, build: ServiceBuilder | None = None, close_service: bool | None = None
) -> web.Application:
    """The daemon's application: it serves at once and builds its edge in the background (`build`, by default
    `EdgeService.open(config.engine)`), answering 503 until it is ready. With `service` it is ready at once and
    the service is borrowed (not closed at cleanup unless `close_service=True`), so tests share one model."""
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=[_errors, _auth])
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[STARTED] = int(time.time())
    if config.token_file is not None:
        app[TOKEN] = read_token(config.token_file)
    builder = build or (lambda: EdgeService.open(config.engine, progress=False))
    app.cleanup_ctx.append(_service_ctx(service, builder, service is None if close_service is None else close_service))
    app.on_shutdown.append(_drain)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    return app


def _service_ctx(service: EdgeService | None, build: ServiceBuilder, close: bool) -> Any:
    async def ctx(app: web.Application) -> AsyncIterator[None]:
        state = app[STATE] = DaemonState()
        task = None
        if service is not None:
            _became_ready(app, service)
        else:
            task = asyncio.create_task(_load(app, build))
        yield
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if state.service is not None and close:
            await state.service.aclose()

    return ctx


async def _load(app: web.Application, build: ServiceBuilder) -> None:
    """Build the edge in a thread (the loop keeps answering /healthz), say hello to the cloud, then serve."""
    state = app[STATE]
    try:
        service = await asyncio.to_thread(build)
        state.service = service
        await service.check_cloud()  # a refusal (wrong token, another model) fails start-up with the cloud's message
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - reported through /healthz and the log; serve() exits on it
        state.phase, state.error = FAILED, f"{type(exc).__name__}: {exc}" if not isinstance(exc, OfframpError) else str(exc)
        log.error("the edge failed to load: %s", state.error)
        state.loaded.set()
        return
    if state.phase == LOADING:
        _became_ready(app, service)


def _became_ready(app: web.Application, service: EdgeService) -> None:
    config, state, m = app[CONFIG], app[STATE], app[METRICS]
    state.service = service
    state.limits = Limits(
        served_model=config.served_model_name or service.model_name,
        context_length=service.max_positions,
        max_tokens_limit=config.max_tokens_limit,
        default_max_tokens=config.default_max_tokens,
    )
    m.sessions.set_function(lambda: service.pool.active)
    m.cloud_up.set_function(lambda: {"up": 1, "down": 0}.get(service.health.state, -1 if service.link is None else 1))
    state.phase = READY
    state.loaded.set()
    log.info("offramp edge ready: model %s, %s, cloud %s, exit layer %d, edge %s", state.limits.served_model, service.mode,
             service.health.url or service.config.cloud_kind, service.exit_layer, service.precision)


async def _drain(app: web.Application) -> None:
    """SIGTERM: /healthz turns 503 and new requests are refused while in-flight ones finish."""
    state = app[STATE]
    if state.phase in (READY, LOADING):
        state.phase = DRAINING


# -- middlewares ------------------------------------------------------------------------------------------------


def _error_response(exc: APIError) -> web.Response:
    return web.json_response(exc.body(), status=exc.status)


@web.middleware
async def _errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every refusal leaves as an OpenAI-style error body; an unexpected failure is a 500, and the daemon goes on."""
    route = request.match_info.route.resource.canonical if request.match_info.route.resource else "unmatched"
    metrics = request.app[METRICS]
    try:
        response = await handler(request)
    except APIError as exc:
        response = _error_response(exc)
    except web.HTTPRequestEntityTooLarge as exc:
        limit = request.app[CONFIG].max_body_bytes
        response = _error_response(
            APIError(f"request body is larger than this daemon's limit of {limit} bytes", status=413, code="request_too_large")
        )
        del exc
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status, "http_error")
        message = f"{request.method} {request.path}: {exc.reason}"
        response = _error_response(APIError(message, status=exc.status, code=kind))
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        response = _error_response(APIError("internal error; see the daemon's log", status=500, type="server_error", code="internal_error"))
    metrics.requests.labels(route, str(response.status)).inc()
    return response


@web.middleware
async def _auth(request: web.Request, handler: Any) -> web.StreamResponse:
    """With a token configured, every route but the probes needs `Authorization: Bearer <token>` (constant-time check)."""
    token = request.app.get(TOKEN)
    if token is not None and request.path not in request.app[CONFIG].open_routes:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise APIError("missing or wrong bearer token", status=401, type="authentication_error", code="invalid_api_key")
    return await handler(request)


# -- routes -----------------------------------------------------------------------------------------------------


async def models(request: web.Request) -> web.Response:
    name = request.app[STATE].ready()[1].served_model
    data = [{"id": name, "object": "model", "created": request.app[STARTED], "owned_by": "offramp"}]
    return web.json_response({"object": "list", "data": data})


async def healthz(request: web.Request) -> web.Response:
    """Liveness and readiness: 200 while the edge can serve (even if the cloud is down: it falls back); 503 while
    loading, draining or after a failed load. No secrets: no token, no credentials in URLs."""
    state = request.app[STATE]
    service = state.service
    if state.phase != READY or service is None or service.closed:
        phase = DRAINING if state.phase == READY else state.phase
        body: dict[str, Any] = {"status": phase, "version": __version__}
        if state.error:
            body["error"] = state.error
        return web.json_response(body, status=503)
    cloud = service.link_state()
    body = {"status": "degraded" if cloud["state"] == "down" else "ok", "version": __version__, "edge": service.describe(), "cloud": cloud}
    return web.json_response(body)


async def metrics(request: web.Request) -> web.Response:
    payload = generate_latest(request.app[METRICS].registry)
    return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=False)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, chat=True)


async def _generate(request: web.Request, chat: bool) -> web.StreamResponse:
    (service, limits), metrics = request.app[STATE].ready(), request.app[METRICS]
    body = parse_json_body(await request.read())
    if chat:
        parsed = parse_chat(body, limits)
        prompt_ids = await service.run_in_pool(_encode_chat, service, parsed.messages)
    else:
        parsed = parse_completion(body, limits, service.vocab_size)
        prompt = parsed.prompt
        prompt_ids = list(prompt) if isinstance(prompt, list) else await service.run_in_pool(service.encode_text, prompt)
    if not prompt_ids:
        raise APIError("the prompt encodes to no tokens", param="prompt", code="invalid_value")
    params = parsed.params
    max_tokens = resolve_max_tokens(params, len(prompt_ids), limits)
    text_request = TextRequest(
        prompt_ids, max_tokens, SamplingParams(params.temperature, params.top_p), params.seed, params.stop, params.top_logprobs
    )
    logprobs = LogprobShaper(chat, service.tokenizer.token_bytes) if params.logprobs else None
    try:
        generation = service.generate(text_request)
    except BusyError as exc:
        raise APIError(str(exc), status=429, type="rate_limit_error", code="too_many_sessions") from None
    metrics.running.inc()
    try:
        if params.stream:
            return await _stream(request, generation, ChunkShaper.start(chat, limits.served_model, params.include_usage, logprobs))
        return await _complete(request, generation, chat, limits.served_model, logprobs)
    finally:
        metrics.running.dec()
        await generation.aclose()  # frees the runtime and the cloud session whatever happened
        if generation.result is not None:
            metrics.observe(generation.result)


def _encode_chat(service: EdgeService, messages: list[dict[str, str]]) -> list[int]:
    try:
        return service.encode_chat(messages)
    except ChatTemplateError as exc:  # the template is the model's own Jinja: it may refuse an order of roles
        raise APIError(str(exc), param="messages", code="invalid_value") from None


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _offramp(generation: TextStream, result: TextResult, logprobs: LogprobShaper | None) -> dict[str, Any]:
    """The `offramp` statistics, from the service that ran it (still there while the daemon drains); with
    logprobs, whose log-prob each token reports."""
    fields = result.offramp_fields(generation.service.exit_layer, generation.service.threshold)
    if logprobs is not None:
        fields["logprob_sources"] = logprob_sources(result.logprobs)
    return fields


def _refused(exc: CloudRefusedError) -> APIError:
    """The cloud refused this edge (wrong token, another model...): an error naming it, never fallback tokens."""
    return APIError(str(exc), status=502, type="server_error", code=f"cloud_{exc.code}")


async def _complete(
    request: web.Request, generation: TextStream, chat: bool, model: str, logprobs: LogprobShaper | None
) -> web.StreamResponse:
    try:
        async for _ in generation:
            if _client_gone(request):
                request.app[METRICS].disconnects.inc()
                log.info("client left %s before its completion; session freed", request.path)
                return web.Response(status=499)
    except CloudRefusedError as exc:
        raise _refused(exc) from None
    result = generation.result
    assert result is not None
    rid, created = new_id("chatcmpl" if chat else "cmpl"), int(time.time())
    shape = chat_object if chat else completion_object
    return web.json_response(shape(rid, model, created, result, _offramp(generation, result, logprobs), logprobs))


async def _stream(request: web.Request, generation: TextStream, shaper: ChunkShaper) -> web.StreamResponse:
    """Server-sent events in OpenAI's chunk format; the final chunk carries finish_reason and `offramp` (and usage,
    unless a last usage-only chunk follows it: stream_options.include_usage)."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    await response.prepare(request)

    async def send(obj: dict[str, Any]) -> None:
        await response.write(b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n")

    try:
        first = shaper.first()
        if first is not None:
            await send(first)
        async for delta in generation:
            if _client_gone(request):
                raise ConnectionResetError("client went away")
            if delta.text or (shaper.logprobs is not None and delta.token_ids):  # every token's log-prob, even one without text
                await send(shaper.piece(delta))
        result = generation.result
        assert result is not None
        await send(shaper.final(result, _offramp(generation, result, shaper.logprobs)))
        if shaper.include_usage:
            await send(shaper.usage_only(result))
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
    except ConnectionResetError:
        request.app[METRICS].disconnects.inc()
        log.info("client left %s mid-stream; session freed", request.path)
    except Exception as exc:  # headers are sent: report in-band, as OpenAI does, then end the stream
        if isinstance(exc, CloudRefusedError):
            log.error("the cloud refused the edge mid-stream: %s", exc)
            error = _refused(exc)
        else:
            log.exception("generation failed mid-stream")
            error = APIError(str(exc), status=500, type="server_error", code="generation_failed")
        try:
            await send(error.body())
            await response.write(b"data: [DONE]\n\n")
        except ConnectionResetError:
            pass
    return response


# -- serving ----------------------------------------------------------------------------------------------------


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind first (port 0 picks a free one) so the actual address can be printed before serving."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise DaemonConfigError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(128)
    sock.setblocking(False)
    return sock


def serve(config: DaemonConfig) -> int:
    """Bind, print the address, load the edge in the background, serve until SIGINT/SIGTERM (in-flight requests
    drain first). Returns the exit status: 0 after a drain, 2 when the edge failed to load."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if config.token_file is not None:
        read_token(config.token_file)  # fail before binding
    sock = bind_socket(config.host, config.port)
    return asyncio.run(_serve(config, sock))


async def _serve(config: DaemonConfig, sock: socket.socket) -> int:
    app = make_app(config, close_service=True)
    runner = web.AppRunner(app, shutdown_timeout=config.shutdown_timeout_s, access_log=logging.getLogger("aiohttp.access"))
    await runner.setup()
    await web.SockSite(runner, sock).start()
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    engine = config.engine
    print(f"offramp edge serve: listening on http://{shown}:{port} (loading {engine.edge or engine.model}; cloud {engine.cloud_kind})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    state = app[STATE]
    failed = asyncio.create_task(_wait_failed(state))
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({failed, stopped}, return_when=asyncio.FIRST_COMPLETED)
    for task in (failed, stopped):
        task.cancel()
    code = 2 if state.phase == FAILED else 0
    if code:
        print(f"offramp: error: {state.error}", file=sys.stderr, flush=True)
    await runner.cleanup()  # stop listening, drain in-flight requests (on_shutdown marks the daemon draining), close
    return code


async def _wait_failed(state: DaemonState) -> None:
    await state.loaded.wait()
    if state.phase != FAILED:
        await asyncio.Event().wait()  # loaded fine: only a signal ends the daemon
