"""Security of the cloud server: TLS, bearer tokens, session ownership between clients, limits.

Covered elsewhere and not repeated here: a missing or wrong token is 401 on every route and one token's session
survives a reconnect (tests/cloud/test_server.py::test_missing_or_wrong_token_is_401_and_the_right_one_works,
::test_sessions_belong_to_the_token_that_opened_them); an unsafe cloud bind and unreadable/empty token files
(::test_unsafe_bind_and_bad_token_files_are_refused); a tiny KV budget evicts without changing tokens
(::test_a_tiny_kv_budget_evicts_and_nothing_is_lost). The edge daemon: bearer token on every route but /healthz
(tests/edge/test_daemon.py::test_bearer_token_is_required_except_for_healthz), 429 when every session is busy
(::test_too_many_sessions_is_429), 413 over the body limit (::test_limits_and_unknown_routes_are_openai_errors),
`offramp edge serve --host 0.0.0.0` refused without a token, with one requiring it and never logging it
(tests/edge/test_daemon_process.py::test_public_bind_without_token_is_refused_and_with_token_requires_it,
tests/edge/test_openai_api.py::test_bind_rules). Every frame-level refusal is fuzzed in test_fuzz_cloud.py; the
daemon's request validation in test_fuzz_daemon.py.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import numpy as np
import pytest
from aiohttp import WSCloseCode

import offramp.cloud.auth as cloud_auth
from offramp.cloud.auth import AuthConfigError, BearerAuth, read_tokens
from offramp.cloud.config import CloudConfig
from offramp.cloud.server import CloudState
from offramp.edge.link import CloudUnavailableError
from offramp.edge.ws_link import WebSocketCloudLink
from offramp.models import load_model
from offramp.models.fingerprint import model_fingerprint
from offramp.shared import protocol as p
from offramp.shared.contract import ExtendRequest
from offramp.shared.auth import read_token_file
from offramp.shared.codecs import get_codec
from offramp.shared.sampling import SamplingParams
from tests.cloud.conftest import K, LAYERS, running_cloud
from tests.cloud.test_server import PROMPTS, full_greedy, generate
from tests.conftest import make_tiny_llama, save_tiny_checkpoint

ALPHA, BETA = "alpha-secret-0123456789abcdef", "beta-secret-fedcba9876543210"
H = 64
START_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(num_layers=LAYERS, seed=11)


@pytest.fixture(scope="module")
def edge_runtime(model):
    from offramp.models.reference_runtime import TorchEdgeRuntime
    from offramp.models.split import EdgePart

    return lambda m=model: TorchEdgeRuntime(EdgePart(m, K))


# -- TLS and tokens against a real `offramp cloud serve` process -------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1 (the openssl CLI: `cryptography` is not installed)."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    return cert, key


class TlsCloud:
    """`offramp cloud serve --ssl-cert --ssl-key --token-file` as a child process (output to a log file)."""

    def __init__(self, model_dir: Path, cert: Path, key: Path, token_file: Path, log: Path) -> None:
        self.log_path = log
        env = {k: v for k, v in os.environ.items() if k not in ("OFFRAMP_CLOUD_TOKEN", "OFFRAMP_TOKEN")}
        env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "offramp.shared.cli", "cloud", "serve", "--model", str(model_dir), "--exit-layer", str(K),
               "--host", "127.0.0.1", "--port", "0", "--threads", "1", "--ssl-cert", str(cert), "--ssl-key", str(key),
               "--token-file", str(token_file)]
        self.proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + START_TIMEOUT_S
        # The serving line, not the listening one: the cloud listens (503) while it loads, and an edge that
        # connected then would get fallback tokens.
        while (match := re.search(r"offramp cloud serving .* on wss://127\.0\.0\.1:(\d+)", self.log())) is None:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("offramp cloud serve did not start:\n" + self.log()[-3000:])
            time.sleep(0.1)
        self.port = int(match.group(1))
        self.url = f"wss://127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


@pytest.fixture(scope="module")
def tls_cloud(tmp_path_factory, certificate):
    where = tmp_path_factory.mktemp("tls-cloud")
    model_dir = save_tiny_checkpoint(where / "tiny", num_layers=LAYERS, seed=11)
    tokens = where / "tokens"
    tokens.write_text(f"# one client per line\n{ALPHA}\n\n{BETA}\n")
    server = TlsCloud(model_dir, *certificate, tokens, where / "cloud.log")
    server.model = load_model(str(model_dir))[0]
    yield server
    server.stop()


def manifest_of(model) -> dict:
    return {"model_fingerprint": model_fingerprint(model), "exit_layer": K, "hidden_size": H, "num_layers": LAYERS}


async def test_wss_certificate_is_verified_unless_trusted_or_told_not_to(tls_cloud, certificate, edge_runtime) -> None:
    model, cert = tls_cloud.model, certificate[0]
    manifest = manifest_of(model)
    strict = WebSocketCloudLink(tls_cloud.url, codec="fp32", manifest=manifest, token=ALPHA, backoff_s=(0.01, 0.01))
    with pytest.raises(CloudUnavailableError) as err:
        await strict.open_session("s-strict")
    assert "CERTIFICATE_VERIFY_FAILED" in str(err.value) and re.search("self.signed", str(err.value))  # says why, clearly
    await strict.aclose()
    trusted = WebSocketCloudLink(tls_cloud.url, codec="fp32", manifest=manifest, token=ALPHA, ca_file=str(cert))
    try:
        tokens, sources, _ = await generate(edge_runtime(model), trusted, PROMPTS[0], 6)
    finally:
        await trusted.aclose()
    assert tokens == full_greedy(model, PROMPTS[0], 6) and set(sources) == {"cloud"}
    insecure = WebSocketCloudLink(tls_cloud.url, codec="fp32", manifest=manifest, token=BETA, verify_tls=False)
    try:
        await insecure.open_session("s-insecure")
        await insecure.close_session("s-insecure")
    finally:
        await insecure.aclose()
    plain = WebSocketCloudLink(f"ws://127.0.0.1:{tls_cloud.port}", codec="fp32", manifest=manifest, token=ALPHA)
    with pytest.raises(CloudUnavailableError):  # no falling back to cleartext
        await plain.open_session("s-plain")
    await plain.aclose()


async def test_tokens_never_reach_the_log_and_wrong_ones_are_401(tls_cloud, certificate) -> None:
    """Wrong tokens of the same length as a real one, of another length, the right token sent as another
    scheme: all 401; both file tokens work. Then the server's whole output must not hold any of them."""
    tls = ssl.create_default_context(cafile=str(certificate[0]))
    same_length = ALPHA[:-1] + ("x" if ALPHA[-1] != "x" else "y")
    async with aiohttp.ClientSession() as http:
        url = f"https://127.0.0.1:{tls_cloud.port}"
        body = {"prompt": [1, 2], "max_tokens": 1}
        for header in (f"Bearer {same_length}", f"Bearer {ALPHA}extra", "Bearer a", f"Basic {ALPHA}", ALPHA, ""):
            async with http.post(url + "/v1/completions", json=body, headers={"Authorization": header} if header else {}, ssl=tls) as resp:
                assert resp.status == 401, header
                assert (await resp.json())["error"]["code"] == p.UNAUTHORIZED
        for token in (ALPHA, BETA):
            async with http.post(url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {token}"}, ssl=tls) as resp:
                assert resp.status == 200
        async with http.get(url + "/healthz", ssl=tls) as resp:  # the probe needs no token and shows none
            assert resp.status == 200 and (await resp.json())["auth"] is True
        async with http.get(url + "/metrics", headers={"Authorization": f"Bearer {ALPHA}"}, ssl=tls) as resp:
            metrics = await resp.text()
    refused = [line for line in metrics.splitlines() if line.startswith('offramp_cloud_errors_total{code="unauthorized"}')]
    assert refused and float(refused[0].split()[-1]) >= 6  # the refusals happened (and were counted, not logged)
    assert tls_cloud.stop() == 0
    log = tls_cloud.log()
    assert "serving" in log and "stopped" in log  # we are reading the real output
    for secret in (ALPHA, BETA, same_length):
        assert secret not in log and secret[:12] not in log


# -- token sources and comparison ----------------------------------------------------------------------------------


def test_token_file_lists_clients_and_env_holds_one(tmp_path, monkeypatch) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text(f"  {ALPHA}  \n# a comment\n\n{BETA}\n")
    assert read_tokens(tokens) == [ALPHA, BETA]
    monkeypatch.setenv("OFFRAMP_CLOUD_TOKEN", f" {BETA}\n")
    assert read_tokens(None) == [BETA]
    monkeypatch.delenv("OFFRAMP_CLOUD_TOKEN")
    assert read_tokens(None) is None
    for text, words in ((f"{ALPHA}\n{ALPHA}\n", "line 2: the same token appears twice"),
                        (f"{ALPHA} {BETA}\n", "line 1: a token cannot contain whitespace"), ("# only a comment\n", "empty")):
        tokens.write_text(text)
        with pytest.raises(AuthConfigError, match=words) as err:
            read_tokens(tokens)
        assert ALPHA not in str(err.value)
    # a client's own token file (the edge, the daemon) holds exactly one token
    tokens.write_text(f"{ALPHA}\n{BETA}\n")
    with pytest.raises(AuthConfigError, match="holds more than one") as err:
        read_token_file(tokens)
    assert ALPHA not in str(err.value) and BETA not in str(err.value)


def test_cloud_state_reads_its_token_from_the_environment(tmp_path, monkeypatch) -> None:
    model_dir = save_tiny_checkpoint(tmp_path / "tiny", num_layers=LAYERS, seed=3)
    monkeypatch.setenv("OFFRAMP_CLOUD_TOKEN", BETA)
    state = CloudState.load(CloudConfig(model=str(model_dir), exit_layer=K, host="0.0.0.0", port=0))
    try:
        assert state.auth.enabled and state.auth.identity(f"Bearer {BETA}") is not None
        assert state.auth.identity(f"Bearer {ALPHA}") is None
        assert BETA not in repr(state.auth) and BETA not in repr(state.config)
    finally:
        state.executor.shutdown()
    monkeypatch.delenv("OFFRAMP_CLOUD_TOKEN")
    with pytest.raises(AuthConfigError, match="0.0.0.0"):  # a public bind without any token
        CloudState.load(CloudConfig(model=str(model_dir), exit_layer=K, host="0.0.0.0", port=0))


def test_every_token_is_compared_in_constant_time(monkeypatch) -> None:
    """hmac.compare_digest against every configured token, whichever matches (or none): no early exit."""
    calls: list[tuple[bytes, bytes]] = []
    real = cloud_auth.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(cloud_auth.hmac, "compare_digest", spy)
    auth = BearerAuth([ALPHA, BETA, "third-token"])
    ids = set()
    for header in (f"Bearer {ALPHA}", f"Bearer {BETA}", "Bearer third-token", f"Bearer {ALPHA[:-1]}z", "Bearer short"):
        calls.clear()
        ids.add(auth.identity(header))
        assert len(calls) == 3, header
    assert len(ids) == 4 and None in ids  # three clients, three identities; the wrong ones get none
    assert ALPHA not in repr(auth)


# -- ownership between clients -------------------------------------------------------------------------------------


async def handshake(cloud, token: str) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(cloud.url + p.EDGE_PATH, headers={"Authorization": f"Bearer {token}"})
    m = cloud.manifest()
    await ws.send_bytes(p.encode_frame(p.Hello(p.PROTOCOL_VERSION, m["model_fingerprint"], m["exit_layer"], m["hidden_size"])))
    assert isinstance(await answer(ws), p.Welcome)
    return http, ws


async def answer(ws: aiohttp.ClientWebSocketResponse, pushed: list[p.Frame] | None = None) -> p.Frame:
    """The next reply; evictions the cloud pushes on its own (id 0) go to `pushed`."""
    while True:
        msg = await ws.receive(timeout=10)
        assert msg.type == aiohttp.WSMsgType.BINARY, msg
        frame = p.decode_frame(msg.data)
        if not (isinstance(frame, p.Evicted) and frame.id == 0):
            return frame
        if pushed is not None:
            pushed.append(frame)


def rows(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, H)).astype(np.float32)


async def test_another_client_cannot_touch_a_session(model) -> None:
    fp32 = get_codec("fp32")
    async with running_cloud(model, token=[ALPHA, BETA]) as cloud:
        a = cloud.link("fp32", token=ALPHA)
        await a.open_session("a-session")
        held = await a.extend(ExtendRequest("a-session", 0, rows(5), want_token=False))
        assert held.length == 5
        http, b = await handshake(cloud, BETA)
        attempts = [p.Open(1, "a-session", "fp32"), p.Extend(2, "a-session", 0, 0, 0, want_token=False, payload=b""), p.Extend(3, "a-session", 0, 5, 1, want_token=False, payload=fp32.encode(rows(1, 9))),
                    p.Extend(4, "a-session", 0, 2, 1, payload=fp32.encode(rows(1, 9))), p.Close(5, "a-session")]
        for frame in attempts:
            await b.send_bytes(p.encode_frame(frame))
            reply = await answer(b)
            assert isinstance(reply, p.Error) and reply.code == p.FORBIDDEN and reply.id == frame.id, (frame, reply)
            assert "another client" in reply.message
        await http.close()
        # A's session is intact: it continues from 5 exactly as a session nobody touched
        continued = await a.extend(ExtendRequest("a-session", 5, rows(1, 1), want_token=True))
        await a.open_session("untouched")
        await a.extend(ExtendRequest("untouched", 0, rows(5), want_token=False))
        untouched = await a.extend(ExtendRequest("untouched", 5, rows(1, 1), want_token=True))
        assert continued.length == untouched.length == 6
        assert (continued.token, continued.predicted) == (untouched.token, untouched.predicted)
        owners = {ctx.owner for ctx in cloud.state.contexts.sessions()}
        assert len(owners) == 1  # both sessions are A's
        await a.aclose()


# -- limits ---------------------------------------------------------------------------------------------------------


async def test_session_limits_per_client_and_in_total_are_coded_errors(model) -> None:
    async with running_cloud(model, token=[ALPHA, BETA], max_sessions=3, max_sessions_per_client=2) as cloud:
        ha, a = await handshake(cloud, ALPHA)
        hb, b = await handshake(cloud, BETA)
        for i in range(2):
            await a.send_bytes(p.encode_frame(p.Open(i + 1, f"a{i}", "fp16")))
            assert isinstance(await answer(a), p.Opened)
        await a.send_bytes(p.encode_frame(p.Open(3, "a2", "fp16")))
        reply = await answer(a)
        assert isinstance(reply, p.Error) and reply.code == p.TOO_MANY_SESSIONS and "per-client limit (2)" in reply.message
        await b.send_bytes(p.encode_frame(p.Open(1, "b0", "fp16")))  # B is not held back by A's per-client limit ...
        assert isinstance(await answer(b), p.Opened)
        await b.send_bytes(p.encode_frame(p.Open(2, "b1", "fp16")))  # ... but by the total
        reply = await answer(b)
        assert isinstance(reply, p.Error) and reply.code == p.TOO_MANY_SESSIONS and "its limit (3)" in reply.message
        await a.send_bytes(p.encode_frame(p.Close(4, "a0")))
        assert isinstance(await answer(a), p.Closed)
        await b.send_bytes(p.encode_frame(p.Open(3, "b1", "fp16")))  # room again
        assert isinstance(await answer(b), p.Opened)
        assert len(cloud.state.engine.contexts) == 3
        await ha.close()
        await hb.close()


async def test_frames_over_the_limit_are_refused_and_the_server_goes_on(model, edge_runtime) -> None:
    limit = 8 << 10
    async with running_cloud(model, max_frame_bytes=limit) as cloud:
        http, ws = await handshake(cloud, "")
        await ws.send_bytes(p.encode_frame(p.Open(1, "s", "fp32")))
        assert isinstance(await answer(ws), p.Opened)
        over = p.encode_frame(p.Extend(2, "s", 0, 0, 33, want_token=False, payload=b"\0" * (33 * 4 * H)))  # 33 fp32 rows: just over 8 KiB
        assert limit < len(over) < limit + (64 << 10)
        await ws.send_bytes(over)
        reply = await answer(ws)
        assert isinstance(reply, p.Error) and reply.code == p.FRAME_TOO_LARGE and str(limit) in reply.message
        await ws.send_bytes(p.encode_frame(p.Extend(3, "s", 0, 0, 2, want_token=False, payload=get_codec("fp32").encode(rows(2)))))  # the connection lives on
        assert isinstance(await answer(ws), p.Result)
        # past what the WebSocket layer buffers (limit + 64 KiB) it closes the connection: close code 1009
        await ws.send_bytes(b"\0" * (limit + (64 << 10) + 1))
        msg = await ws.receive(timeout=10)
        assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED) and ws.close_code == WSCloseCode.MESSAGE_TOO_BIG
        await http.close()
        link = cloud.link("fp32")  # and another edge is served as before
        tokens, _, _ = await generate(edge_runtime(), link, PROMPTS[1], 5)
        await link.aclose()
    assert tokens == full_greedy(model, PROMPTS[1], 5)


async def test_kv_budget_is_never_exceeded_and_the_owner_is_told(model) -> None:
    budget_mb = 0.01  # ~10 KB: 20 positions of the tiny model's deep KV (512 B each)
    fp32 = get_codec("fp32")
    async with running_cloud(model, kv_budget_mb=budget_mb) as cloud:
        http, ws = await handshake(cloud, "")
        pushed: list[p.Frame] = []
        for i in range(4):
            await ws.send_bytes(p.encode_frame(p.Open(10 + i, f"s{i}", "fp32")))
            assert isinstance(await answer(ws, pushed), p.Opened)
            await ws.send_bytes(p.encode_frame(p.Extend(20 + i, f"s{i}", 0, 0, 12, want_token=False, payload=fp32.encode(rows(12, i)))))
            assert isinstance(await answer(ws, pushed), p.Result)
            assert cloud.state.engine.contexts.nbytes <= int(budget_mb * (1 << 20))
        with pytest.raises(asyncio.TimeoutError):  # any still on their way
            while True:
                pushed.append(p.decode_frame((await ws.receive(timeout=0.5)).data))
        assert len(pushed) >= 2 and all(isinstance(f, p.Evicted) and f.id == 0 and f.reason == "memory budget" for f in pushed)
        evicted = pushed[0].session
        await ws.send_bytes(p.encode_frame(p.Extend(30, evicted, 0, 12, 1, want_token=False, payload=fp32.encode(rows(1)))))
        reply = await answer(ws)
        assert isinstance(reply, p.Evicted) and reply.have == 0  # re-upload from 0: the edge holds the states
        await http.close()


async def test_cloud_only_completions_over_the_limit_are_429(model) -> None:
    async with running_cloud(model, max_sessions=1, batch_window_s=0.02) as cloud, aiohttp.ClientSession() as http:
        url = cloud.http_url + "/v1/completions"
        async with http.post(url, json={"prompt": PROMPTS[0], "max_tokens": 60, "stream": True}) as first:
            await first.content.readline()  # the first chunk: it holds the only slot now
            async with http.post(url, json={"prompt": PROMPTS[1], "max_tokens": 2}) as second:
                body = await second.json()
                assert second.status == 429, body
            assert body["error"]["code"] == "too_many_sessions" and body["error"]["type"] == "rate_limit_error"
            assert "retry" in body["error"]["message"]
            rest = await first.read()
            assert rest.endswith(b"data: [DONE]\n\n")
        async with http.post(url, json={"prompt": PROMPTS[1], "max_tokens": 2}) as third:
            assert third.status == 200 and len((await third.json())["choices"][0]["token_ids"]) == 2


async def test_too_many_requests_in_flight_on_one_connection_are_refused_by_id(model, monkeypatch) -> None:
    import offramp.cloud.edge_connection as edge_connection

    monkeypatch.setattr(edge_connection, "MAX_INFLIGHT_PER_CONNECTION", 4)
    fp32 = get_codec("fp32")
    async with running_cloud(model, batch_window_s=0.05) as cloud:
        http, ws = await handshake(cloud, "")
        await ws.send_bytes(p.encode_frame(p.Open(1, "s", "fp32")))
        assert isinstance(await answer(ws), p.Opened)
        ids = list(range(100, 140))
        for rid in ids:  # a burst: each re-uploads position 0, so every one is valid on its own
            await ws.send_bytes(p.encode_frame(p.Extend(rid, "s", 0, 0, 1, want_token=False, payload=fp32.encode(rows(1, rid)))))
        replies = [await answer(ws) for _ in ids]
        assert sorted(r.id for r in replies) == ids  # every request answered once, by its id
        refused = [r for r in replies if isinstance(r, p.Error)]
        assert refused and all(r.code == p.OVERLOADED and "in flight" in r.message for r in refused)
        assert any(isinstance(r, p.Result) for r in replies)
        await ws.send_bytes(p.encode_frame(p.Extend(200, "s", 0, 0, 1, want_token=False, payload=fp32.encode(rows(1)))))  # and it recovers
        assert isinstance(await answer(ws), p.Result)
        await http.close()
