"""Edge-daemon test helpers: an in-process daemon on a random loopback port (its own loop thread), and a
`DaemonProcess` that runs `offramp edge serve` for real, in the spirit of llama.cpp's ServerProcess."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiohttp import web

from offramp.edge.config import EdgeConfig
from offramp.edge.daemon import DaemonConfig, make_app
from offramp.edge.service import EdgeService

REQUEST_TIMEOUT = 60.0  # every HTTP call in these tests; a hung daemon fails the test instead of stalling CI


class ThreadedServer:
    """An aiohttp app served on 127.0.0.1:<random> by a loop on a background thread, so sync and async tests can call it."""

    def __init__(self, app: web.Application) -> None:
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-daemon", daemon=True)
        self.thread.start()
        self.runner = web.AppRunner(app, shutdown_timeout=5)
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=60)
        self.base_url = f"http://127.0.0.1:{self.port}"

    async def _start(self) -> None:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def start_daemon(service: EdgeService, **daemon_fields) -> ThreadedServer:
    """A daemon app around an existing service (the model is shared; the app does not close the service)."""
    config = DaemonConfig(engine=service.config, port=0, **daemon_fields)
    return ThreadedServer(make_app(config, service))


def http(method: str, url: str, body: bytes | dict | None = None, headers: dict | None = None) -> tuple[int, dict | str]:
    """One request with a timeout; returns (status, parsed JSON or text), never raising for HTTP errors."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as resp:
            status, raw, ctype = resp.status, resp.read(), resp.headers.get("Content-Type", "")
    except urllib.error.HTTPError as exc:
        status, raw, ctype = exc.code, exc.read(), exc.headers.get("Content-Type", "")
    text = raw.decode("utf-8", "replace")
    return status, json.loads(text) if "json" in ctype else text


def sse_events(text: str) -> list:
    """The `data:` payloads of an SSE body, JSON-decoded except the final [DONE]."""
    out = []
    for line in text.splitlines():
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


@pytest.fixture(scope="session")
def default_edge_dir(default_model) -> Path:
    """The default model's edge directory at K=15 (fp32 graph, untrained head), exported once into the cache."""
    from offramp.models.edge_dir import ensure_edge_dir

    return ensure_edge_dir("default", 15, ["fp32"], use_trained=False, loaded=default_model, progress=False)[0]


def open_service(edge_dir: Path, loaded=None, **fields) -> EdgeService:
    """An EdgeService on an exported edge directory (fp32 graph unless told otherwise)."""
    return EdgeService.open(EdgeConfig(edge=edge_dir, precision=fields.pop("precision", "fp32"), **fields), loaded=loaded)


@pytest.fixture(scope="session")
def standalone_service(default_edge_dir):
    service = open_service(default_edge_dir, cloud="none", max_sessions=4, workers=2)
    yield service
    asyncio.run(service.aclose())


@pytest.fixture(scope="session")
def collab_service(default_edge_dir, default_model):
    """--cloud local with fp32 hidden states and a threshold nothing reaches: every token is the full model's."""
    service = open_service(default_edge_dir, default_model, cloud="local", codec="fp32", threshold=2.0, max_sessions=4, workers=2)
    yield service
    asyncio.run(service.aclose())


@pytest.fixture(scope="session")
def standalone_daemon(standalone_service):
    server = start_daemon(standalone_service, max_tokens_limit=512)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def collab_daemon(collab_service):
    server = start_daemon(collab_service, max_tokens_limit=512)
    yield server
    server.stop()


@dataclass
class DaemonProcess:
    """`offramp edge serve` as a subprocess; fields mirror the CLI flags. start() waits for /healthz."""

    cloud: str = "none"
    edge: Path | None = None  # an exported edge dir (--edge); None: --model (default) --exit-layer, exported into the cache
    exit_layer: int = 15
    threshold: float = 0.9
    edge_precision: str = "fp32"
    codec: str = "fp16"
    host: str = "127.0.0.1"
    token_file: Path | None = None
    extra: list[str] = field(default_factory=list)
    launcher: list[str] | None = None  # the `offramp` command (default: this venv's)
    env: dict[str, str] | None = None  # the process environment (default: this one's)
    proc: subprocess.Popen | None = None
    port: int | None = None
    output: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> "DaemonProcess":
        script = Path(sys.executable).with_name("offramp")
        launcher = self.launcher or ([str(script)] if script.exists() else [sys.executable, "-m", "offramp.shared.cli"])
        source = ["--edge", str(self.edge)] if self.edge is not None else ["--exit-layer", str(self.exit_layer)]
        cmd = [
            *launcher, "edge", "serve", *source,
            "--cloud", self.cloud, "--threshold", str(self.threshold),
            "--edge-precision", self.edge_precision, "--codec", self.codec, "--host", self.host, "--port", "0",
            "--workers", "2", *self.extra,
        ]  # fmt: skip
        if self.token_file is not None:
            cmd += ["--token-file", str(self.token_file)]
        env = dict(self.env if self.env is not None else os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        threading.Thread(target=self._drain, daemon=True).start()
        deadline = time.monotonic() + timeout
        while self.port is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("offramp edge serve did not start:\n" + "".join(self.output[-40:]))
            time.sleep(0.1)
        if not wait_until(self._healthy, timeout=max(1.0, deadline - time.monotonic()), interval=0.2):
            self.stop()
            raise RuntimeError("offramp edge serve never became healthy:\n" + "".join(self.output[-40:]))
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            match = re.search(r"listening on http://[^:]+:(\d+)", line)
            if match and self.port is None:
                self.port = int(match.group(1))

    def _healthy(self) -> bool:
        try:
            return http("GET", self.base_url + "/healthz")[0] == 200
        except OSError:
            return False

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM and wait: the daemon must drain and exit by itself; kill only as a last resort."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            raise
