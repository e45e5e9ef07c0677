"""`offramp cloud serve --replicas N`: the cloud tier on Ray Serve, N deep-engine replicas behind one address.

    app = build_app(CloudConfig(model=..., exit_layer=15), RayOptions(replicas=2))
    serve.run(app, name=APP_NAME, route_prefix="/")

Two deployments (see README, "Scaling out on Ray Serve"): `EdgeIngress` (`offramp.cloud.ray_ingress`, no model,
holds the edges' WebSockets) and `EngineReplica` (`offramp.cloud.ray_engine`, a whole `CloudState` each), called
once per frame through a handle whose router (`offramp.cloud.ray_router`) keeps every session on one replica.
Ray Serve places, health-checks, restarts and (with --min/--max-replicas) scales the engine replicas; autoscaling
follows the frames in flight per replica (escalations and uploads waiting or computing), not open WebSockets.
"""

from __future__ import annotations

import signal
import socket
import threading
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve.config import RequestRouterConfig

from offramp.cloud.auth import check_bind, read_tokens
from offramp.cloud.config import CloudConfig
from offramp.cloud.ray_engine import EngineReplica
from offramp.cloud.ray_ingress import ENGINE, EdgeIngress
from offramp.cloud.ray_router import SessionRouter
from offramp.shared import protocol as p

ROUTER = f"{SessionRouter.__module__}.{SessionRouter.__qualname__}"  # by name: Serve imports it where it routes

APP_NAME = "offramp"
INGRESS = "EdgeIngress"
MAX_FRAMES_PER_REPLICA = 256  # frames in flight at one engine replica (its batcher takes them together)
MAX_EDGE_SOCKETS = 10_000  # an edge's WebSocket is one request for its whole life: Serve's default of 5 would cap edges


@dataclass
class RayOptions:
    replicas: int = 1
    min_replicas: int | None = None  # with max_replicas: autoscaling between them
    max_replicas: int | None = None
    target_frames: float = 4.0  # autoscaling aims at this many frames in flight per replica
    replica_cpus: float = 1.0  # Ray CPUs reserved per engine replica (torch uses as many threads, at least 1)
    ray_address: str | None = None  # join this cluster; None starts a local one
    health_check_period_s: float = 2.0


def engine_options(options: RayOptions) -> dict:
    """The engine deployment's Serve options."""
    engine: dict = dict(
        name=ENGINE,
        max_ongoing_requests=MAX_FRAMES_PER_REPLICA,
        health_check_period_s=options.health_check_period_s,
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=5.0,
        ray_actor_options={"num_cpus": options.replica_cpus},
        request_router_config=RequestRouterConfig(request_router_class=ROUTER),
    )
    if options.min_replicas is not None or options.max_replicas is not None:
        low = options.min_replicas if options.min_replicas is not None else 1
        high = options.max_replicas if options.max_replicas is not None else max(low, options.replicas)
        engine["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, "initial_replicas": min(max(options.replicas, low), high),
                                        "target_ongoing_requests": options.target_frames}
    else:
        engine["num_replicas"] = options.replicas
    return engine


def build_app(config: CloudConfig, options: RayOptions, tokens: list[str] | None = None):
    """The Serve application: the ingress bound to the engine deployment."""
    threads = max(1, int(options.replica_cpus))
    engines = serve.deployment(EngineReplica).options(**engine_options(options)).bind(config, threads)
    ingress = serve.deployment(EdgeIngress).options(
        name=INGRESS, num_replicas=1, max_ongoing_requests=MAX_EDGE_SOCKETS, ray_actor_options={"num_cpus": 0})
    return ingress.bind(engines, tokens, config.metrics_require_token, config.max_frame_bytes)


def http_options(config: CloudConfig, port: int) -> dict:
    opts: dict = {"host": config.host, "port": port}
    if config.ssl_cert is not None:
        opts.update(ssl_certfile=str(config.ssl_cert), ssl_keyfile=str(config.ssl_key or config.ssl_cert))
    return opts


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def serve_on_ray(config: CloudConfig, options: RayOptions) -> None:
    """Start (or join) Ray, deploy, serve until SIGTERM/SIGINT, then take the application down."""
    tokens = read_tokens(config.token_file)
    check_bind(config.host, tokens)
    port = config.port or free_port(config.host)
    local = options.ray_address is None
    ray.init(address=options.ray_address, include_dashboard=False, logging_level="WARNING")
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options=http_options(config, port))
        scheme = "wss" if config.ssl_cert else "ws"
        print(f"offramp cloud on Ray Serve: loading {config.model} in {options.replicas} engine replica(s)", flush=True)
        serve.run(build_app(config, options, tokens), name=APP_NAME, route_prefix="/", blocking=False)
        print(f"offramp cloud serving {config.model} from layer {config.exit_layer} on {scheme}://{config.host}:{port}{p.EDGE_PATH} "
              f"(Ray Serve, auth {'on' if tokens else 'off'})", flush=True)
        stop.wait()
        print("offramp cloud: stopping", flush=True)
    finally:
        if local:
            serve.shutdown()
        else:
            serve.delete(APP_NAME)
        ray.shutdown()
        print("offramp cloud: stopped", flush=True)
