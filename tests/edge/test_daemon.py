"""The edge daemon in-process on a random loopback port with the real default model: the OpenAI client, streaming,
exactness, bad requests, auth, concurrency, disconnects, fallback, health and metrics."""

from __future__ import annotations

import asyncio
from http.client import HTTPConnection
import json
import threading

import pytest

from offramp.cloud.full_model import FullModelRunner
from offramp.cloud.local_link import local_link
from offramp.edge.config import EdgeConfig
from offramp.edge.daemon import STATE, DaemonConfig, make_app
from offramp.edge.decode_loop import CLOUD, FALLBACK
from offramp.edge.link import CloudUnavailableError
from offramp.edge.service import EdgeService
from tests.edge.conftest import REQUEST_TIMEOUT, ThreadedServer, http, open_service, sse_events, start_daemon, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

QUESTION = "What is gravity?"


def chat_body(max_tokens: int = 8, **extra) -> dict:
    return {"model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens, "temperature": 0, **extra}


def openai_client(server, **kwargs):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key=kwargs.pop("api_key", "unused"), timeout=REQUEST_TIMEOUT, max_retries=0, **kwargs)


def test_openai_package_completes_and_streams_a_chat(standalone_daemon) -> None:
    client = openai_client(standalone_daemon)
    assert [m.id for m in client.models.list().data] == ["SmolLM2-135M-Instruct"]
    done = client.chat.completions.create(
        model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": QUESTION}], max_tokens=6, temperature=0
    )
    assert done.object == "chat.completion" and done.choices[0].message.role == "assistant"
    assert done.choices[0].finish_reason in ("stop", "length") and done.choices[0].message.content
    assert done.usage.completion_tokens == len(done.offramp["sources"]) <= 6 and done.usage.prompt_tokens > 0
    for key in ("edge_exits", "escalations", "fallback_tokens", "bytes_up", "bytes_down", "mode", "sources"):
        assert key in done.offramp
    assert done.offramp["mode"] == "edge-standalone" and done.offramp["escalations"] == 0

    chunks = list(
        client.chat.completions.create(
            model="SmolLM2-135M-Instruct", messages=[{"role": "user", "content": QUESTION}], max_tokens=6, temperature=0,
            stream=True, stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == done.choices[0].message.content  # greedy: the same answer either way
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].usage is None  # include_usage: the counts come once, in the last chunk
    assert finals[0].offramp["sources"] == done.offramp["sources"]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == done.usage.total_tokens

    legacy = client.completions.create(model="SmolLM2-135M-Instruct", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert legacy.object == "text_completion" and legacy.usage.completion_tokens >= 1


def test_stream_format_ends_with_done_and_carries_stats(collab_daemon) -> None:
    status, text = http("POST", collab_daemon.base_url + "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 6, "temperature": 0, "stream": True})
    assert status == 200
    events = sse_events(text)
    assert events[-1] == "[DONE]"
    final = events[-2]
    assert final["choices"][0]["finish_reason"] in ("stop", "length") and final["object"] == "text_completion"
    assert final["usage"]["completion_tokens"] == final["offramp"]["tokens"] == len(final["offramp"]["sources"])
    assert final["offramp"]["mode"] == "collaborative" and set(final["offramp"]["sources"]) == {CLOUD}
    assert final["offramp"]["bytes_up"] > 0 and final["offramp"]["bytes_down"] > 0
    streamed_ids = [i for e in events[:-2] for i in e["offramp"]["token_ids"]]
    assert streamed_ids == final["offramp"]["token_ids"][: len(streamed_ids)]


def test_greedy_collaborative_is_bit_exact_with_the_full_model(collab_daemon, collab_service, default_model) -> None:
    """threshold > 1, fp32 codec, fp32 edge graph: every token comes from the cloud and equals the reference."""
    model, tokenizer = default_model
    status, body = http("POST", collab_daemon.base_url + "/v1/chat/completions", chat_body(max_tokens=16))
    assert status == 200
    prompt_ids = collab_service.encode_chat([{"role": "user", "content": QUESTION}])
    reference = list(FullModelRunner(model).generate_ids(prompt_ids, 16, stop_ids=collab_service.stop_ids))
    assert body["offramp"]["token_ids"] == reference
    assert body["usage"]["prompt_tokens"] == len(prompt_ids)
    assert body["choices"][0]["message"]["content"] == tokenizer.decode(reference, skip_special_tokens=True)


def test_stop_string_is_cut_and_not_returned(collab_daemon) -> None:
    base = {"prompt": "The capital of France is", "max_tokens": 12, "temperature": 0}
    status, full = http("POST", collab_daemon.base_url + "/v1/completions", base)
    text = full["choices"][0]["text"]
    assert status == 200 and "." in text, text
    status, cut = http("POST", collab_daemon.base_url + "/v1/completions", {**base, "stop": ["."]})
    assert cut["choices"][0]["text"] == text[: text.index(".")]
    assert cut["choices"][0]["finish_reason"] == "stop"
    status, streamed = http("POST", collab_daemon.base_url + "/v1/completions", {**base, "stop": ".", "stream": True})
    events = sse_events(streamed)
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == cut["choices"][0]["text"]


def test_seeded_sampling_is_reproducible(standalone_daemon) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0.9, "top_p": 0.95, "seed": 1234}
    first = http("POST", standalone_daemon.base_url + "/v1/completions", body)[1]
    second = http("POST", standalone_daemon.base_url + "/v1/completions", body)[1]
    assert first["offramp"]["token_ids"] == second["offramp"]["token_ids"]


BAD_REQUESTS = [
    ("malformed json", b'{"messages": [', "invalid_json"),
    ("invalid utf-8", b'{"messages": [{"role": "user", "content": "\xff\xfe"}]}', "invalid_utf8"),
    ("not an object", b"[]", "invalid_json"),
    ("wrong type", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": "ten"}, "invalid_type"),
    ("wrong messages", {"messages": "hi"}, "invalid_type"),
    ("unknown model", {"model": "gpt-5", "messages": [{"role": "user", "content": "hi"}]}, "model_not_found"),
    ("max_tokens over the limit", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, "max_tokens_exceeded"),
    ("prompt over the context", {"messages": [{"role": "user", "content": "gravity " * 9000}], "max_tokens": 4}, "context_length_exceeded"),
    ("prompt + max_tokens over the context", {"messages": [{"role": "user", "content": "gravity " * 8100}], "max_tokens": 500}, "context_length_exceeded"),
]


@pytest.mark.parametrize("name, body, code", BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_400_and_the_daemon_keeps_serving(standalone_daemon, name, body, code) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    status, answer = http("POST", standalone_daemon.base_url + "/v1/chat/completions", raw, {"Content-Type": "application/json"})
    assert status == 400, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["code"] == code and answer["error"]["type"] == "invalid_request_error"
    assert http("GET", standalone_daemon.base_url + "/healthz")[0] == 200


def test_limits_and_unknown_routes_are_openai_errors(standalone_daemon) -> None:
    base = standalone_daemon.base_url
    status, answer = http("POST", base + "/v1/completions", b'{"prompt": "' + b"a" * (2 << 20) + b'"}')
    assert status == 413 and answer["error"]["code"] == "request_too_large"
    status, answer = http("GET", base + "/v1/nope")
    assert status == 404 and answer["error"]["code"] == "not_found"
    status, answer = http("GET", base + "/v1/completions")
    assert status == 405 and "error" in answer
    status, answer = http("POST", base + "/v1/completions", {"prompt": [1, 2, 10**6]})
    assert status == 400 and answer["error"]["param"] == "prompt"
    # still serving
    status, answer = http("POST", base + "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "temperature": 0})
    assert status == 200 and answer["usage"]["completion_tokens"] >= 1


def test_bearer_token_is_required_except_for_the_probes(standalone_service, tmp_path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("correct-horse\n")
    server = start_daemon(standalone_service, token_file=token_file)
    closed = start_daemon(standalone_service, token_file=token_file, metrics_require_token=True)
    try:
        base = server.base_url
        status, health = http("GET", base + "/healthz")
        assert status == 200 and "correct-horse" not in json.dumps(health)
        assert http("GET", base + "/metrics")[0] == 200  # Prometheus scrapes without a token
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic correct-horse"}):
            status, answer = http("GET", base + "/v1/models", headers=headers)
            assert status == 401 and answer["error"]["type"] == "authentication_error"
            assert http("GET", closed.base_url + "/metrics", headers=headers)[0] == 401
        assert http("GET", closed.base_url + "/healthz")[0] == 200
        assert http("GET", closed.base_url + "/metrics", headers={"Authorization": "Bearer correct-horse"})[0] == 200
        assert http("GET", base + "/v1/models", headers={"Authorization": "Bearer correct-horse"})[0] == 200
        client = openai_client(server, api_key="correct-horse")
        done = client.completions.create(model="default", prompt="Hi", max_tokens=2, temperature=0)
        assert done.usage.completion_tokens >= 1
    finally:
        server.stop()
        closed.stop()


def _stream_chunks(base_url: str, body: dict, arrivals: list, lock: threading.Lock, index: int) -> None:
    """Read one stream, noting each chunk's arrival in the shared order `arrivals` as (request, chunk number)."""
    conn = HTTPConnection("127.0.0.1", int(base_url.rsplit(":", 1)[1]), timeout=REQUEST_TIMEOUT)
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    seen = 0
    for line in resp:
        if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
            with lock:
                arrivals.append((index, seen))
            seen += 1
    conn.close()


def test_concurrent_requests_interleave(collab_daemon, collab_service) -> None:
    body = {"prompt": "List the planets of the solar system:", "max_tokens": 10, "temperature": 0, "stream": True}
    arrivals: list = []
    lock = threading.Lock()
    threads = [threading.Thread(target=_stream_chunks, args=(collab_daemon.base_url, body, arrivals, lock, i)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=REQUEST_TIMEOUT * 2)
    order = [i for i, _ in arrivals]
    assert sorted(set(order)) == [0, 1, 2], arrivals
    last_firsts = max(order.index(i) for i in range(3))
    first_lasts = min(len(order) - 1 - order[::-1].index(i) for i in range(3))
    assert last_firsts < first_lasts, arrivals  # every request had output before any finished: their decode steps interleaved
    assert wait_until(lambda: collab_service.pool.active == 0, timeout=10)
    assert len(collab_service.link.engine.contexts) == 0  # every cloud session was closed


def test_too_many_sessions_is_429(default_edge_dir) -> None:
    service = open_service(default_edge_dir, cloud="none", max_sessions=1, workers=1)
    server = start_daemon(service)
    try:
        conn = HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": "Count: 1, 2, 3,", "max_tokens": 200, "stream": True}))
        resp = conn.getresponse()
        resp.readline()  # the first chunk: the session is live
        status, answer = http("POST", server.base_url + "/v1/completions", {"prompt": "Hi", "max_tokens": 1})
        assert status == 429 and answer["error"]["code"] == "too_many_sessions"
        conn.close()
        assert wait_until(lambda: service.pool.active == 0, timeout=30)
        assert http("POST", server.base_url + "/v1/completions", {"prompt": "Hi", "max_tokens": 1})[0] == 200
    finally:
        server.stop()
        asyncio.run(service.aclose())


def test_client_disconnect_mid_stream_frees_edge_and_cloud_sessions(default_edge_dir, default_model) -> None:
    service = open_service(default_edge_dir, default_model, cloud="local", codec="fp32", threshold=2.0, max_sessions=2, workers=2)
    server = start_daemon(service)
    try:
        conn = HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT)
        body = {"messages": [{"role": "user", "content": "Write a long story about a dragon."}], "max_tokens": 400, "temperature": 0, "stream": True}
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        resp = conn.getresponse()
        seen = 0
        while seen < 3:
            if resp.readline().startswith(b"data: "):
                seen += 1
        assert service.pool.active == 1 and len(service.link.engine.contexts) == 1
        conn.sock.close()  # the client goes away mid-stream
        conn.close()
        assert wait_until(lambda: service.pool.active == 0, timeout=30), "the edge session was not freed"
        assert len(service.link.engine.contexts) == 0, "the cloud session was not closed"
        runtime = service.pool._idle[-1]
        assert runtime.length < 60 + 400  # generation stopped early, far short of max_tokens
        _, metrics = http("GET", server.base_url + "/metrics")
        assert "offramp_edge_client_disconnects_total 1.0" in metrics
        assert http("POST", server.base_url + "/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200
    finally:
        server.stop()
        asyncio.run(service.aclose())


class FlakyLink:
    """The local cloud that answers `good` extends and then is unreachable."""

    def __init__(self, model, good: int) -> None:
        self.inner = local_link(model, 15, "fp32")
        self.codec, self.deep_layers, self.stats = "fp32", self.inner.deep_layers, self.inner.stats
        self.good = good

    async def open_session(self, sid, stats=None):
        await self.inner.open_session(sid, stats)

    async def extend(self, request, stats=None):
        if self.good <= 0:
            raise CloudUnavailableError("cloud unreachable (test)")
        self.good -= 1
        return await self.inner.extend(request, stats=stats)

    async def close_session(self, sid, stats=None):
        if self.good <= 0:  # still unreachable when the generation ends
            raise CloudUnavailableError("cloud unreachable (test)")
        await self.inner.close_session(sid, stats)

    async def aclose(self):
        await self.inner.aclose()


def test_unreachable_cloud_completes_with_fallback_tokens_and_health_says_so(default_edge_dir, default_model) -> None:
    link = FlakyLink(default_model[0], good=3)
    service = EdgeService.open(EdgeConfig(edge=default_edge_dir, precision="fp32", cloud="local", threshold=2.0, workers=2), link=link)
    server = start_daemon(service)
    try:
        status, body = http("POST", server.base_url + "/v1/chat/completions", chat_body(max_tokens=8))
        assert status == 200 and body["choices"][0]["finish_reason"] in ("stop", "length")
        sources = body["offramp"]["sources"]
        assert sources[:3] == [CLOUD] * 3 and set(sources[3:]) == {FALLBACK}
        assert body["offramp"]["fallback_tokens"] == len(sources) - 3
        status, health = http("GET", server.base_url + "/healthz")
        assert status == 200 and health["status"] == "degraded"
        assert health["cloud"]["state"] == "down" and "unreachable" in health["cloud"]["last_error"]
        _, metrics = http("GET", server.base_url + "/metrics")
        assert "offramp_edge_cloud_link_up 0.0" in metrics
    finally:
        server.stop()
        asyncio.run(service.aclose())


def test_health_and_metrics(collab_daemon) -> None:
    status, health = http("GET", collab_daemon.base_url + "/healthz")
    assert status == 200 and health["status"] == "ok"
    assert health["edge"]["mode"] == "collaborative" and health["edge"]["exit_layer"] == 15
    assert health["cloud"]["mode"] == "local" and health["cloud"]["state"] == "up"
    http("POST", collab_daemon.base_url + "/v1/completions", {"prompt": "Hi", "max_tokens": 2, "temperature": 0})
    status, metrics = http("GET", collab_daemon.base_url + "/metrics")
    assert status == 200
    for name in (
        "offramp_edge_requests_total",
        "offramp_edge_requests_running",
        "offramp_edge_generated_tokens_total",
        "offramp_edge_prompt_tokens_total",
        "offramp_edge_link_bytes_total",
        "offramp_edge_time_to_first_token_seconds_bucket",
        "offramp_edge_request_duration_seconds_bucket",
        "offramp_edge_sessions_active",
        "offramp_edge_cloud_link_up",
    ):
        assert name in metrics, name
    cloud_tokens = [line for line in metrics.splitlines() if line.startswith('offramp_edge_generated_tokens_total{source="cloud"}')]
    assert cloud_tokens and float(cloud_tokens[0].split()[-1]) > 0


def test_app_loads_its_own_edge_when_not_given_one(default_edge_dir) -> None:
    """make_app(config) alone: the edge is loaded in the background and the service closed at cleanup."""
    config = DaemonConfig(engine=EdgeConfig(edge=default_edge_dir, precision="fp32", cloud="none", workers=1), port=0)
    server = ThreadedServer(make_app(config))
    try:
        assert wait_until(lambda: http("GET", server.base_url + "/healthz")[0] == 200, timeout=120)
        status, body = http("POST", server.base_url + "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert status == 200 and body["offramp"]["mode"] == "edge-standalone"
    finally:
        server.stop()  # runs the app's cleanup, which closes the service it made
    assert server.app[STATE].service.closed


def test_healthz_is_503_while_loading_and_draining(standalone_service) -> None:
    """Readiness: 503 (and generation refused with 503) until the edge is built, 200 while serving, 503 draining."""
    release = threading.Event()

    def slow_build():
        assert release.wait(REQUEST_TIMEOUT)
        return standalone_service

    config = DaemonConfig(engine=standalone_service.config, port=0)
    server = ThreadedServer(make_app(config, build=slow_build, close_service=False))
    try:
        status, body = http("GET", server.base_url + "/healthz")
        assert status == 503 and body["status"] == "loading" and "edge" not in body
        status, answer = http("POST", server.base_url + "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert status == 503 and answer["error"]["code"] == "loading"
        release.set()
        assert wait_until(lambda: http("GET", server.base_url + "/healthz")[0] == 200, timeout=60)
        assert http("POST", server.base_url + "/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 200
        asyncio.run_coroutine_threadsafe(server.app.shutdown(), server.loop).result(timeout=30)  # what SIGTERM runs first
        status, body = http("GET", server.base_url + "/healthz")
        assert status == 503 and body["status"] == "draining"
        assert http("POST", server.base_url + "/v1/completions", {"prompt": "Hi", "max_tokens": 2})[0] == 503
    finally:
        release.set()
        server.stop()


def test_a_failed_load_is_503_with_the_reason(standalone_service) -> None:
    def broken_build():
        raise CloudUnavailableError("no such edge (test)")

    server = ThreadedServer(make_app(DaemonConfig(engine=standalone_service.config, port=0), build=broken_build))
    try:
        assert wait_until(lambda: http("GET", server.base_url + "/healthz")[1].get("status") == "failed", timeout=30)
        status, body = http("GET", server.base_url + "/healthz")
        assert status == 503 and "no such edge (test)" in body["error"]
    finally:
        server.stop()
