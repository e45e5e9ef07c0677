"""`offramp cloud serve`: the cloud server as a process."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from offramp.cloud.config import CloudConfig
from offramp.shared.cli import config_from_args


def register(subparsers: argparse._SubParsersAction) -> None:
    cloud = subparsers.add_parser("cloud", help="the cloud server")
    commands = cloud.add_subparsers(dest="cloud_command", required=True)
    d = CloudConfig()
    p = commands.add_parser("serve", help="serve layers K..N-1 to edges over a WebSocket, plus the cloud-only API")
    p.add_argument("--model", default=d.model, help="'default', a local HF checkpoint dir, or a .gguf file")
    p.add_argument("--exit-layer", type=int, default=d.exit_layer, help="K: the cloud runs layers K..N-1")
    p.add_argument("--host", default=d.host, help="bind address; anything but loopback needs --token-file")
    p.add_argument("--port", type=int, default=d.port, help="0 picks a free port (printed at start)")
    p.add_argument("--token-file", type=Path, default=None, help="bearer tokens, one per line, each a client with its own sessions (else one token in $OFFRAMP_CLOUD_TOKEN); never logged")
    p.add_argument("--max-sessions", type=int, default=d.max_sessions, help="edge sessions held for all clients together (and cloud-only completions running at once; over it: HTTP 429)")
    p.add_argument("--max-sessions-per-client", type=int, default=d.max_sessions_per_client, help="sessions one token may hold; over it: error frame too_many_sessions")
    p.add_argument("--kv-budget-mb", type=float, default=d.kv_budget_mb, help="deep-KV memory budget; least recently used sessions are evicted above it")
    p.add_argument("--session-ttl", type=float, default=d.session_ttl_s, help="seconds an idle session is kept")
    p.add_argument("--max-frame-bytes", type=int, default=d.max_frame_bytes, help="largest frame accepted; over it: error frame frame_too_large")
    p.add_argument("--max-batch", type=int, default=d.max_batch, help="requests per batched forward")
    p.add_argument("--batch-window-ms", type=float, default=d.batch_window_s * 1000, help="wait for more requests to batch")
    p.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    p.add_argument("--load-in-8bit", action="store_true", help="int8 decoder-layer weights via bitsandbytes (the gpu extra)")
    p.add_argument("--ssl-cert", type=Path, default=None, help="serve wss:// with this certificate chain (PEM); edges verify it unless --insecure, or trust it with --cloud-ca-file")
    p.add_argument("--ssl-key", type=Path, default=None, help="private key for --ssl-cert (PEM)")
    p.add_argument("--metrics-require-token", action="store_true", help="/metrics needs the bearer token too (by default /healthz and /metrics answer without one, for probes and Prometheus)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    ray = p.add_argument_group("scaling out on Ray Serve (the ray extra: pip install 'offramp[ray]'); any of these serves through Ray")
    ray.add_argument("--replicas", type=int, default=None, help="deep-engine replicas behind this one address, each with its own sessions and batcher")
    ray.add_argument("--min-replicas", type=int, default=None, help="autoscale between --min-replicas and --max-replicas on the frames waiting per replica")
    ray.add_argument("--max-replicas", type=int, default=None, help="see --min-replicas")
    ray.add_argument("--target-frames", type=float, default=4.0, help="autoscaling target: escalation/upload frames in flight per replica")
    ray.add_argument("--replica-cpus", type=float, default=1.0, help="Ray CPUs per engine replica (its torch threads, at least 1)")
    ray.add_argument("--ray-address", default=None, help="join this Ray cluster (e.g. ray://head:10001 or auto); default: start a local one")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from offramp.cloud.server import serve

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = config_from_args(CloudConfig, args, session_ttl_s=args.session_ttl, batch_window_s=args.batch_window_ms / 1000)
    if any(v is not None for v in (args.replicas, args.min_replicas, args.max_replicas, args.ray_address)):
        return _serve_on_ray(config, args)
    asyncio.run(serve(config))
    return 0


def _serve_on_ray(config: CloudConfig, args: argparse.Namespace) -> int:
    try:
        from offramp.cloud.ray_serve import RayOptions, serve_on_ray
    except ImportError as exc:  # the default install has no Ray
        raise SystemExit(f"--replicas/--ray-address need Ray Serve: pip install 'offramp[ray]' ({exc})") from None
    replicas = args.replicas if args.replicas is not None else (args.min_replicas or 1)
    if replicas < 1 or (args.min_replicas is not None and args.max_replicas is not None and args.min_replicas > args.max_replicas):
        raise SystemExit("--replicas must be >= 1 and --min-replicas <= --max-replicas")
    serve_on_ray(config, RayOptions(replicas=replicas, min_replicas=args.min_replicas, max_replicas=args.max_replicas,
                                    target_frames=args.target_frames, replica_cpus=args.replica_cpus, ray_address=args.ray_address))
    return 0
