"""`offramp bench replicas`: the single cloud server against Ray Serve with 1 and 2 engine replicas, side by side.

Each cloud is a real `offramp cloud serve` process on a random model of the default model's width (16 layers,
split at 8, so a deep step costs what a real one does per layer); the edge side is a `WebSocketCloudLink` sending
random layer-K states. Measured per cloud: seconds until it serves, the median latency of a lone escalation, and
deep-layer tokens per second with N sessions escalating at once. On a 2-core machine the absolute numbers say
what the Ray hops cost (proxy, ingress, handle), not how replicas scale: that needs a core (or GPU) per replica.

`--autoscale` instead starts `--min-replicas 1 --max-replicas 2 --target-frames 1 --replica-cpus 0.5`, keeps N sessions escalating
and polls /healthz until Ray Serve has added the second replica (or the time runs out), printing the replica
list as it goes: autoscaling on frames in flight, live.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from offramp.bench.processes import CloudServer

K, LAYERS, HIDDEN = 8, 16, 576
CLOUDS = (
    ("single server, 1 thread", []),  # CloudServer runs every cloud with --threads 1
    ("Ray Serve, 1 replica x 1 CPU", ["--replicas", "1", "--replica-cpus", "1"]),
    ("Ray Serve, 2 replicas x 1 CPU", ["--replicas", "2", "--replica-cpus", "1"]),
)


def start_cloud(checkpoint: Path, args: list[str], log: Path, timeout_s: float = 300.0) -> tuple[CloudServer, float]:
    """`offramp cloud serve` until it prints that it serves; returns the server and the seconds that took. Not
    /healthz: a Ray cloud's ingress answers it before every replica is up, and a replica joining later moves
    sessions."""
    server = CloudServer(str(checkpoint), K, extra_args=args, log_path=log, process_group=True)
    started = time.monotonic()
    server.launch()
    while "offramp cloud serving" not in log.read_text():
        if server.proc.poll() is not None or time.monotonic() - started > timeout_s:
            server.stop()
            raise RuntimeError(f"the cloud did not start ({' '.join(args)}); see {log}")
        time.sleep(0.2)
    return server, time.monotonic() - started


async def one_session(link, rng: np.random.Generator, prompt: int, steps: int, latencies: list[float] | None = None) -> int:
    """Open, upload a prompt's states, escalate `steps` tokens one by one, close; returns deep-layer tokens run."""
    from offramp.shared.contract import ExtendRequest

    session = os.urandom(8).hex()
    await link.open_session(session)
    await link.extend(ExtendRequest(session, 0, rng.standard_normal((prompt, HIDDEN)).astype(np.float32) * 0.5, want_token=False))
    for i in range(steps):
        t = time.perf_counter()
        await link.extend(ExtendRequest(session, prompt + i, rng.standard_normal((1, HIDDEN)).astype(np.float32) * 0.5))
        if latencies is not None:
            latencies.append(time.perf_counter() - t)
    await link.close_session(session)
    return (prompt + steps) * (LAYERS - K)


async def measure(port: int, manifest: dict, sessions: int) -> dict:
    from offramp.edge.ws_link import WebSocketCloudLink

    link = WebSocketCloudLink(f"ws://127.0.0.1:{port}", codec="fp32", manifest=manifest, timeout_s=120)
    rng = np.random.default_rng(0)
    lone: list[float] = []
    try:
        await one_session(link, rng, 16, 4)  # warm-up: connection, first allocations
        for _ in range(2):
            await one_session(link, rng, 16, 30, lone)
        started = time.perf_counter()
        tokens = sum(await asyncio.gather(*(one_session(link, rng, 16, 24) for _ in range(sessions))))
        wall = time.perf_counter() - started
    finally:
        await link.aclose()
    return {"lone_escalation_ms": float(np.median(lone)) * 1e3, "sessions": sessions,
            "deep_tokens_per_s": tokens / wall, "wall_s": wall}


async def watch_autoscaling(port: int, manifest: dict, sessions: int, limit_s: float) -> list[tuple[float, list]]:
    """Keep `sessions` escalating until /healthz lists a second replica or `limit_s` passes; the replica lists seen."""
    import urllib.request

    from offramp.edge.ws_link import WebSocketCloudLink

    def replicas() -> list:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
            return [r["pid"] for r in json.loads(resp.read())["replicas"]]

    link = WebSocketCloudLink(f"ws://127.0.0.1:{port}", codec="fp32", manifest=manifest, timeout_s=120)
    rng = np.random.default_rng(0)
    done = asyncio.Event()

    moved = 0

    async def keep_escalating() -> None:
        nonlocal moved
        from offramp.shared.contract import ContextMismatchError

        while not done.is_set():
            try:
                await one_session(link, rng, 16, 64)
            except ContextMismatchError:  # the ring changed under it: the decode loop re-uploads; this client starts over
                moved += 1

    load = [asyncio.create_task(keep_escalating()) for _ in range(sessions)]
    started, seen = time.monotonic(), []
    try:
        while time.monotonic() - started < limit_s:
            await asyncio.sleep(5)
            seen.append((time.monotonic() - started, await asyncio.to_thread(replicas)))
            print(f"{seen[-1][0]:5.0f} s: replicas {seen[-1][1]}", flush=True)
            if len(seen[-1][1]) > 1:
                break
    finally:
        done.set()
        await asyncio.gather(*load)  # a failed escalation fails the run
        await link.aclose()
    print(f"sessions that found their context gone on a new replica (the decode loop re-uploads it): {moved}")
    return seen


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="offramp bench replicas", description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=16, help="sessions escalating at once")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    ap.add_argument("--autoscale", action="store_true", help="watch Ray Serve add a replica under load instead")
    ap.add_argument("--autoscale-limit", type=float, default=240.0, help="--autoscale: seconds to wait for the second replica")
    args = ap.parse_args(argv)
    from offramp.models import load_model
    from offramp.models.fingerprint import model_fingerprint
    from offramp.models.tiny import save_tiny_checkpoint

    work = Path(tempfile.mkdtemp(prefix="offramp-replicas-"))
    checkpoint = save_tiny_checkpoint(work / "ckpt", num_layers=LAYERS, seed=3, hidden_size=HIDDEN, intermediate_size=1536,
                                      num_attention_heads=9, num_key_value_heads=3, vocab_size=4096, max_position_embeddings=1024)
    model, _ = load_model(str(checkpoint))
    manifest = {"model_fingerprint": model_fingerprint(model), "exit_layer": K, "hidden_size": HIDDEN, "num_layers": LAYERS}
    if args.autoscale:
        flags = ["--min-replicas", "1", "--max-replicas", "2", "--target-frames", "1", "--replica-cpus", "0.5"]
        server, ready_s = start_cloud(checkpoint, flags, work / "cloud-autoscale.log")
        try:
            seen = asyncio.run(watch_autoscaling(server.port, manifest, args.sessions, args.autoscale_limit))
        finally:
            server.stop(timeout_s=120)
        grew = next((t for t, pids in seen if len(pids) > 1), None)
        print(f"ready in {ready_s:.1f} s; " + (f"a second replica after {grew:.0f} s of load" if grew is not None
                                               else f"no second replica within {args.autoscale_limit:.0f} s"))
        return 0 if grew is not None else 1
    rows = []
    for name, flags in CLOUDS:
        server, ready_s = start_cloud(checkpoint, flags, work / f"cloud-{len(rows)}.log")
        try:
            row = {"cloud": name, "ready_s": ready_s, **asyncio.run(measure(server.port, manifest, args.sessions))}
        finally:
            server.stop(timeout_s=120)
        rows.append(row)
        print(f"{name:32s} ready {ready_s:5.1f} s  lone escalation {row['lone_escalation_ms']:6.1f} ms  "
              f"{args.sessions} sessions: {row['deep_tokens_per_s']:8.0f} deep-layer tokens/s ({row['wall_s']:.1f} s)", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f}")
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
