"""`offramp edge serve` as a real process on loopback: standalone, collaborative (in-process cloud, and a ws://
cloud from `offramp cloud serve`) and fallback (a cloud URL on a closed port, a cloud killed mid-run)."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.edge.conftest import REQUEST_TIMEOUT, DaemonProcess, http, sse_events, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CHAT = {"messages": [{"role": "user", "content": "What is gravity?"}], "max_tokens": 8, "temperature": 0}


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("cloud, mode", [("none", "edge-standalone"), ("local", "collaborative")])
def test_serve_process_answers_the_openai_package_and_exits_on_sigterm(cloud, mode, default_edge_dir) -> None:
    openai = pytest.importorskip("openai")
    daemon = DaemonProcess(cloud=cloud, edge=default_edge_dir, threshold=2.0 if cloud == "local" else 0.9).start()
    try:
        client = openai.OpenAI(base_url=daemon.base_url + "/v1", api_key="unused", timeout=REQUEST_TIMEOUT, max_retries=0)
        stream = client.chat.completions.create(model="SmolLM2-135M-Instruct", stream=True, **CHAT)
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        final = chunks[-1]
        assert text and final.choices[0].finish_reason in ("stop", "length")
        assert final.offramp["mode"] == mode
        expected = {"edge"} if cloud == "none" else {"cloud"}
        assert set(final.offramp["sources"]) == expected
        status, health = http("GET", daemon.base_url + "/healthz")
        assert status == 200 and health["cloud"]["state"] == ("disabled" if cloud == "none" else "up")
        status, text = http("POST", daemon.base_url + "/v1/completions", {"prompt": "Hello", "max_tokens": 3, "stream": True})
        events = sse_events(text)
        assert status == 200 and events[-1] == "[DONE]" and "usage" in events[-2] and "offramp" in events[-2]
        assert re.match(r"cmpl-[0-9a-f]+", events[0]["id"])
        status, body = http("POST", daemon.base_url + "/v1/chat/completions", b"{not json")
        assert status == 400 and body["error"]["code"] == "invalid_json"
        assert http("GET", daemon.base_url + "/v1/models")[0] == 200  # still serving
    finally:
        rc = daemon.stop()
    assert rc == 0, "".join(daemon.output[-20:])


def test_sigterm_drains_an_in_flight_request(default_edge_dir) -> None:
    daemon = DaemonProcess(cloud="none", edge=default_edge_dir).start()
    result: dict = {}

    def request() -> None:
        result["answer"] = http("POST", daemon.base_url + "/v1/completions", {"prompt": "Count: 1, 2, 3,", "max_tokens": 24, "temperature": 0})

    worker = threading.Thread(target=request)
    worker.start()
    assert wait_until(lambda: http("GET", daemon.base_url + "/healthz")[1]["edge"]["sessions_active"] == 1, timeout=30)
    rc = daemon.stop()
    worker.join(timeout=REQUEST_TIMEOUT)
    status, body = result["answer"]
    assert status == 200 and body["usage"]["completion_tokens"] == 24  # finished, not cut
    assert rc == 0


def test_public_bind_without_token_is_refused_and_with_token_requires_it(tmp_path, default_edge_dir) -> None:
    script = Path(sys.executable).with_name("offramp")
    launcher = [str(script)] if script.exists() else [sys.executable, "-m", "offramp.shared.cli"]
    refused = subprocess.run([*launcher, "edge", "serve", "--cloud", "none", "--host", "0.0.0.0"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "--token-file" in refused.stderr
    token = tmp_path / "token"
    token.write_text("tok-123\n")
    daemon = DaemonProcess(cloud="none", edge=default_edge_dir, host="0.0.0.0", token_file=token).start()
    try:
        assert http("GET", daemon.base_url + "/v1/models")[0] == 401
        assert http("GET", daemon.base_url + "/v1/models", headers={"Authorization": "Bearer tok-123"})[0] == 200
        assert "tok-123" not in "".join(daemon.output)  # never logged
    finally:
        assert daemon.stop() == 0


def test_cloud_on_a_closed_port_means_fallback_tokens_and_health_down(default_edge_dir) -> None:
    daemon = DaemonProcess(cloud=f"ws://127.0.0.1:{closed_port()}", edge=default_edge_dir, threshold=2.0).start()
    try:
        started = time.monotonic()
        status, body = http("POST", daemon.base_url + "/v1/chat/completions", CHAT)
        assert status == 200, body
        assert set(body["offramp"]["sources"]) == {"edge-fallback"}
        assert body["offramp"]["fallback_tokens"] == body["usage"]["completion_tokens"]
        assert time.monotonic() - started < REQUEST_TIMEOUT
        status, health = http("GET", daemon.base_url + "/healthz")
        assert health["cloud"]["state"] == "down" and health["status"] == "degraded"
    finally:
        assert daemon.stop() == 0


class CloudProcess:
    """`offramp cloud serve` on a free port (flags per the cloud server's CLI)."""

    def __init__(self, port: int) -> None:
        self.port = port
        script = Path(sys.executable).with_name("offramp")
        launcher = [str(script)] if script.exists() else [sys.executable, "-m", "offramp.shared.cli"]
        cmd = [*launcher, "cloud", "serve", "--host", "127.0.0.1", "--port", str(port), "--exit-layer", "15"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.output: list[str] = []
        threading.Thread(target=lambda: self.output.extend(self.proc.stdout), daemon=True).start()
        if not wait_until(self._ready, timeout=300, interval=0.2):
            self.kill()
            raise RuntimeError("offramp cloud serve did not start:\n" + "".join(self.output[-30:]))

    def _ready(self) -> bool:
        """Exited, or its /healthz says ready: it listens (503) while loading, and an edge that connected then
        would get fallback tokens, which the tests here do not mean to test."""
        if self.proc.poll() is not None:
            return True
        try:
            return http("GET", f"http://127.0.0.1:{self.port}/healthz")[0] == 200
        except OSError:
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=30)


def test_ws_cloud_collaborates_then_falls_back_when_killed(default_edge_dir) -> None:
    port = closed_port()
    cloud = CloudProcess(port)
    daemon = DaemonProcess(cloud=f"ws://127.0.0.1:{port}", edge=default_edge_dir, threshold=2.0, codec="fp32").start()
    try:
        assert cloud.proc.poll() is None, "".join(cloud.output[-30:])
        status, body = http("POST", daemon.base_url + "/v1/chat/completions", CHAT)
        assert status == 200 and set(body["offramp"]["sources"]) == {"cloud"}, body
        assert body["offramp"]["bytes_up"] > 0
        cloud.kill()
        status, body = http("POST", daemon.base_url + "/v1/chat/completions", CHAT)
        assert status == 200 and "edge-fallback" in body["offramp"]["sources"]
        assert http("GET", daemon.base_url + "/healthz")[1]["cloud"]["state"] == "down"
    finally:
        cloud.kill()
        daemon.stop()
