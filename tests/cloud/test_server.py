"""The cloud server with real sockets on loopback: exactness over the wire, concurrency, eviction, refusals."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import msgpack
import numpy as np
import pytest

from aiohttp import web

from offramp.cloud.auth import AuthConfigError, BearerAuth, check_bind, read_tokens
from offramp.cloud.config import CloudConfig
from offramp.cloud.server import CloudState, make_app
from offramp.cloud.full_model import FullModelRunner
from offramp.edge.decode_loop import CLOUD, EDGE, CollaborativeDecoder, DecodeOptions
from offramp.edge.link import CloudUnavailableError
from offramp.edge.ws_link import CloudRefusedError, LinkConfigError, edge_url
from offramp.shared import protocol as p
from offramp.shared.sampling import SamplingParams
from offramp.models.fingerprint import model_fingerprint
from tests.cloud.conftest import K, LAYERS, running_cloud

PROMPTS = [[5, 17, 3, 99, 42, 8], [1, 2, 3], list(range(30, 52)), [77], [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 11]]


def full_greedy(model, prompt, n) -> list[int]:
    return list(FullModelRunner(model).generate_ids(prompt, n))


async def generate(runtime, link, prompt, n=16, threshold=1.5, confidence=None) -> tuple[list[int], list[str], CollaborativeDecoder]:
    kwargs = {"confidence": confidence} if confidence else {}
    decoder = CollaborativeDecoder(runtime, link, LAYERS, **kwargs)
    events = [e async for e in decoder.stream(prompt, DecodeOptions(max_new_tokens=n, threshold=threshold, lossless=False, max_draft=1))]
    return [e.token_id for e in events], [e.source for e in events], decoder


def alternating():
    """A confidence that exits every other token, so catch-up uploads (n > 1) and escalations mix."""
    flips = iter([1.0, 0.0] * 1000)
    return lambda logits, hidden: next(flips)


async def test_always_escalate_fp32_over_the_network_equals_full_model(model, edge_runtime) -> None:
    async with running_cloud(model) as cloud:
        link = cloud.link("fp32")
        try:
            for prompt in PROMPTS[:3]:
                tokens, sources, decoder = await generate(edge_runtime(), link, prompt, n=20)
                assert tokens == full_greedy(model, prompt, 20)
                assert set(sources) == {CLOUD}
                assert decoder.stats.bytes_up > (len(prompt) + 19) * 64 * 4  # fp32 rows plus framing
                assert decoder.stats.bytes_down > 0
        finally:
            await link.aclose()


async def test_lossless_mode_over_the_network_equals_full_model(model, edge_runtime) -> None:
    async with running_cloud(model) as cloud:
        link = cloud.link("fp32")
        try:
            for prompt in PROMPTS[:3]:
                decoder = CollaborativeDecoder(edge_runtime(), link, LAYERS, confidence=lambda lg, h: 1.0)
                opts = DecodeOptions(max_new_tokens=20, max_draft=4)
                tokens = [e.token_id async for e in decoder.stream(prompt, opts)]
                assert tokens == full_greedy(model, prompt, 20)  # (drafts per round trip depend on timing: see test_decode_loop)
        finally:
            await link.aclose()


async def test_sixteen_concurrent_sessions_get_the_tokens_they_get_alone(model, edge_runtime) -> None:
    async with running_cloud(model, batch_window_s=0.005) as cloud:
        link = cloud.link("fp16")
        try:
            prompts = [PROMPTS[i % len(PROMPTS)] + [i] for i in range(16)]
            alone = [await generate(edge_runtime(), link, pr, 12, 0.5, alternating()) for pr in prompts]
            together = await asyncio.gather(*(generate(edge_runtime(), link, pr, 12, 0.5, alternating()) for pr in prompts))
            for (a_tokens, a_sources, _), (t_tokens, t_sources, _) in zip(alone, together):
                assert t_tokens == a_tokens and t_sources == a_sources == [EDGE, CLOUD] * 6
            async with aiohttp.ClientSession() as http, http.get(cloud.http_url + "/metrics") as resp:
                text = await resp.text()
        finally:
            await link.aclose()
    batched = [line for line in text.splitlines() if line.startswith('offramp_cloud_batch_size_sum{engine="deep"}')]
    count = [line for line in text.splitlines() if line.startswith('offramp_cloud_batch_size_count{engine="deep"}')]
    assert float(batched[0].split()[-1]) > float(count[0].split()[-1])  # some forwards served several sessions


async def test_evicted_session_finishes_with_the_same_tokens(model, edge_runtime) -> None:
    prompt = PROMPTS[2]
    async with running_cloud(model) as cloud:
        link = cloud.link("fp32")
        reference, _, _ = await generate(edge_runtime(), link, prompt, 16, 0.5, alternating())
        engine = cloud.state.engine
        original = engine.extend_batch

        def extend_then_evict(reqs):  # drop every session's context after each answer: each request re-uploads
            out = original(reqs)
            for req in reqs:
                engine.contexts.evict(req.session_id, "test")
            return out

        engine.extend_batch = extend_then_evict
        try:
            tokens, sources, decoder = await generate(edge_runtime(), link, prompt, 16, 0.5, alternating())
        finally:
            engine.extend_batch = original
            await link.aclose()
    assert tokens == reference and FALLBACK_FREE(sources)
    assert cloud.state.engine.contexts.evictions >= 8


async def test_a_tiny_kv_budget_evicts_and_nothing_is_lost(model, edge_runtime) -> None:
    prompts = [PROMPTS[2] + [i] for i in range(4)]
    async with running_cloud(model) as cloud:
        link = cloud.link("fp32")
        alone = [await generate(edge_runtime(), link, pr, 10) for pr in prompts]
        await link.aclose()
    async with running_cloud(model, kv_budget_mb=0.02) as cloud:  # ~20 KB: about one session's deep KV
        link = cloud.link("fp32")
        together = await asyncio.gather(*(generate(edge_runtime(), link, pr, 10) for pr in prompts))
        await link.aclose()
        assert cloud.state.engine.contexts.evictions > 0
    assert [t for t, _, _ in together] == [t for t, _, _ in alone]


def FALLBACK_FREE(sources: list[str]) -> bool:
    return "edge-fallback" not in sources


async def test_fingerprint_and_exit_layer_mismatch_are_refused_clearly(model, edge_runtime) -> None:
    async with running_cloud(model) as cloud:
        for manifest, words in ((cloud.manifest(model_fingerprint="0" * 64), "fingerprint"), (cloud.manifest(exit_layer=1), "layer")):
            link = cloud.link(manifest=manifest)
            with pytest.raises(CloudRefusedError) as err:
                await link.open_session("s1")
            assert err.value.code == p.MODEL_MISMATCH and words in str(err.value)
            await link.aclose()
        # and the server keeps serving a good edge
        link = cloud.link()
        tokens, _, _ = await generate(edge_runtime(), link, PROMPTS[0], 5)
        await link.aclose()
    assert tokens == full_greedy(model, PROMPTS[0], 5)


async def raw_ws(cloud, headers=None):
    session = aiohttp.ClientSession()
    ws = await session.ws_connect(cloud.url + p.EDGE_PATH, headers=headers or {})
    return session, ws


async def recv(ws) -> p.Frame:
    msg = await ws.receive(timeout=10)
    assert msg.type == aiohttp.WSMsgType.BINARY, msg
    return p.decode_frame(msg.data)


async def test_protocol_version_mismatch_gets_an_error_frame(model) -> None:
    async with running_cloud(model) as cloud:
        session, ws = await raw_ws(cloud)
        m = cloud.manifest()
        await ws.send_bytes(p.encode_frame(p.Hello(p.PROTOCOL_VERSION + 1, m["model_fingerprint"], m["exit_layer"], m["hidden_size"])))
        reply = await recv(ws)
        assert isinstance(reply, p.Error) and reply.code == p.VERSION_MISMATCH
        await session.close()


async def test_missing_or_wrong_token_is_401_and_the_right_one_works(model, edge_runtime) -> None:
    async with running_cloud(model, token="s3cret") as cloud:
        async with aiohttp.ClientSession() as http:
            for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "s3cret"}):
                for method, path in (("GET", p.EDGE_PATH), ("POST", "/v1/completions")):
                    async with http.request(method, cloud.http_url + path, headers=headers, json={"prompt": [1], "max_tokens": 1}) as resp:
                        assert resp.status == 401
                        assert "token" in (await resp.json())["error"]["message"]
        with pytest.raises(CloudRefusedError) as err:
            await cloud.link(token="nope").open_session("x")
        assert err.value.code == p.UNAUTHORIZED
        link = cloud.link(token="s3cret")
        tokens, sources, _ = await generate(edge_runtime(), link, PROMPTS[1], 6)
        await link.aclose()
    assert tokens == full_greedy(model, PROMPTS[1], 6) and set(sources) == {CLOUD}


async def test_probes_answer_without_a_token_and_hold_no_secret(model) -> None:
    """Orchestrators and Prometheus scrape /healthz and /metrics without credentials (as vLLM and llama.cpp allow)."""
    async with running_cloud(model, token="s3cret") as cloud:
        async with aiohttp.ClientSession() as http:
            async with http.get(cloud.http_url + "/healthz") as resp:
                assert resp.status == 200
                body = await resp.text()
                assert json.loads(body)["status"] == "ok" and "s3cret" not in body
            async with http.get(cloud.http_url + "/metrics") as resp:
                assert resp.status == 200 and "offramp_cloud_sessions" in await resp.text()
    async with running_cloud(model, token="s3cret", metrics_require_token=True) as cloud:
        async with aiohttp.ClientSession() as http:
            async with http.get(cloud.http_url + "/metrics") as resp:
                assert resp.status == 401
            async with http.get(cloud.http_url + "/metrics", headers={"Authorization": "Bearer s3cret"}) as resp:
                assert resp.status == 200
            async with http.get(cloud.http_url + "/healthz") as resp:
                assert resp.status == 200


async def test_a_loading_cloud_answers_503_until_its_state_is_installed(model) -> None:
    from offramp.cloud.server import install_state

    cfg = CloudConfig(model="tiny", exit_layer=K, port=0)
    app = make_app(auth=BearerAuth(None))
    runner = web.AppRunner(app, shutdown_timeout=5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as http:
            for method, path in (("GET", "/healthz"), ("GET", "/metrics"), ("GET", p.EDGE_PATH), ("POST", "/v1/completions")):
                async with http.request(method, url + path, json={"prompt": [1]}) as resp:
                    assert resp.status == 503, path
                    assert (await resp.json())["status"] == "loading"
            install_state(app, CloudState(cfg, model, None, model_fingerprint(model), BearerAuth(None), model_name="tiny"))
            async with http.get(url + "/healthz") as resp:
                assert resp.status == 200
    finally:
        await runner.cleanup()


async def test_sessions_belong_to_the_token_that_opened_them(model) -> None:
    async with running_cloud(model, token="alpha") as cloud:
        a = cloud.link(token="alpha")
        await a.open_session("shared-id")
        await a.aclose()
        # the same token from another connection may continue (a reconnecting edge) ...
        again = cloud.link(token="alpha")
        await again.open_session("shared-id")
        await again.aclose()
        assert cloud.state.contexts.peek("shared-id").owner != "anonymous"


async def test_malformed_frames_get_error_frames_and_the_server_keeps_serving(model, edge_runtime) -> None:
    async with running_cloud(model) as cloud:
        session, ws = await raw_ws(cloud)
        m = cloud.manifest()
        await ws.send_bytes(p.encode_frame(p.Hello(p.PROTOCOL_VERSION, m["model_fingerprint"], m["exit_layer"], m["hidden_size"])))
        assert isinstance(await recv(ws), p.Welcome)
        bad_frames = [
            b"\xc1garbage",
            msgpack.packb({"type": "teleport", "id": 3}),
            msgpack.packb({"type": "open", "id": 4, "session": 12, "codec": "fp32"}),
            msgpack.packb({"type": "open", "id": 5, "session": "s", "codec": "zip"}),
            msgpack.packb({"type": "extend", "id": 6, "session": "never-opened", "epoch": 0, "start": 0, "rows": 1, "payload": b"x"}),
            msgpack.packb([1, 2, 3]),
        ]
        for data in bad_frames:
            await ws.send_bytes(data)
        replies = [await recv(ws) for _ in bad_frames]
        await ws.send_str("text is not a frame")
        replies.append(await recv(ws))
        # an escalation with a payload of the wrong size for its declared rows
        await ws.send_bytes(p.encode_frame(p.Open(7, "mine", "fp32")))
        assert isinstance(await recv(ws), p.Opened)
        await ws.send_bytes(p.encode_frame(p.Extend(8, "mine", 0, 0, 2, b"\0" * 12)))
        replies.append(await recv(ws))
        nan = np.full((1, 64), np.nan, dtype=np.float32).tobytes()
        await ws.send_bytes(p.encode_frame(p.Extend(9, "mine", 0, 0, 1, nan)))
        replies.append(await recv(ws))
        await session.close()
        kinds = [(type(r).__name__, getattr(r, "code", None)) for r in replies]
        assert sum(1 for k, _ in kinds if k == "Error") == len(replies) - 1, kinds
        assert ("Evicted", None) in kinds  # the never-opened session: re-open and upload from 0
        assert all(getattr(r, "message", "x") for r in replies)
        link = cloud.link()
        tokens, _, _ = await generate(edge_runtime(), link, PROMPTS[0], 5)
        await link.aclose()
    assert tokens == full_greedy(model, PROMPTS[0], 5)


async def test_unreachable_cloud_means_fallback_and_backoff(model, edge_runtime) -> None:
    async with running_cloud(model) as cloud:
        url = cloud.url
    link = cloud.link(backoff_s=(5.0, 5.0))
    link.url = edge_url(url)
    tokens, sources, decoder = await generate(edge_runtime(), link, PROMPTS[0], 6)
    assert set(sources) == {"edge-fallback"} and decoder.stats.fallback_tokens == 6
    assert link.state in ("idle", "down") and "cannot reach" in link.last_error
    with pytest.raises(CloudUnavailableError, match="next try"):
        await link.open_session("x")
    await link.aclose()


async def test_completions_endpoint_runs_the_whole_model(model) -> None:
    async with running_cloud(model) as cloud, aiohttp.ClientSession() as http:
        prompt = PROMPTS[2]
        async with http.post(cloud.http_url + "/v1/completions", json={"prompt": prompt, "max_tokens": 12}) as resp:
            body = await resp.json()
        assert resp.status == 200 and body["choices"][0]["token_ids"] == full_greedy(model, prompt, 12)
        assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 12, "total_tokens": len(prompt) + 12}
        streamed = []
        async with http.post(cloud.http_url + "/v1/completions", json={"prompt": prompt, "max_tokens": 12, "stream": True}) as resp:
            lines = [line async for line in resp.content]
        events = [line.decode().strip()[len("data: "):] for line in lines if line.startswith(b"data: ")]
        assert events[-1] == "[DONE]"
        for event in events[:-1]:
            streamed += json.loads(event)["choices"][0]["token_ids"]
        assert streamed == body["choices"][0]["token_ids"]
        for bad in ({"prompt": []}, {"prompt": [1], "max_tokens": 0}, {"prompt": [10**9]}, {"prompt": "text"}, {"prompt": [1], "temperature": -1}):
            async with http.post(cloud.http_url + "/v1/completions", json=bad) as resp:
                assert resp.status == 400 and (await resp.json())["error"]["message"]
        async with http.post(cloud.http_url + "/v1/completions", data=b"{nope") as resp:
            assert resp.status == 400
        async with http.get(cloud.http_url + "/healthz") as resp:
            health = await resp.json()
        assert resp.status == 200 and health["exit_layer"] == 2 and health["deep_layers"] == 2


async def test_completions_refuse_fields_they_do_not_serve_by_name(model) -> None:
    """The baseline serves prompt, model, max_tokens, temperature, top_p, seed and stream; anything else a client
    sends expecting an effect (stop, logprobs, penalties, tools...) is a 400 naming it, not silently ignored."""
    base = {"prompt": PROMPTS[0], "max_tokens": 2}
    unserved = {"stop": "\n", "logprobs": 1, "presence_penalty": 0.5, "logit_bias": {"3": 1}, "n": 2, "echo": True,
                "stream_options": {"include_usage": True}, "tools": [{"type": "function"}], "suffix": "x", "made_up": 1}
    async with running_cloud(model) as cloud, aiohttp.ClientSession() as http:
        url = cloud.http_url + "/v1/completions"
        for name, value in unserved.items():
            async with http.post(url, json={**base, name: value}) as resp:
                error = (await resp.json())["error"]
            assert resp.status == 400 and error["param"] == name and f"'{name}'" in error["message"], (name, error)
            assert error["code"] in ("unsupported_field", "unsupported_value") and error["type"] == "invalid_request_error"
        async with http.post(url, json={**base, "model": "gpt-4"}) as resp:
            assert resp.status == 400 and (await resp.json())["error"]["code"] == "model_not_found"
        neutral = {**base, "model": "default", "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "stop": None}
        async with http.post(url, json=neutral) as resp:
            assert resp.status == 200 and len((await resp.json())["choices"][0]["token_ids"]) == 2
        async with http.post(url, json={**base, "model": ["tiny"]}) as resp:  # not a string: a 400, not a 500
            error = (await resp.json())["error"]
            assert resp.status == 400 and (error["param"], error["code"]) == ("model", "invalid_type"), error
        labelled = {**base, "model": "tiny", "user": "u-1"}  # the served name and a caller label: served
        async with http.post(url, json=labelled) as resp:
            assert resp.status == 200, await resp.text()


async def test_sampling_over_the_network_is_reproducible(model, edge_runtime) -> None:
    async with running_cloud(model) as cloud:
        link = cloud.link("fp32")
        runs = []
        for _ in range(2):
            decoder = CollaborativeDecoder(edge_runtime(), link, LAYERS)
            opts = DecodeOptions(max_new_tokens=10, threshold=1.5, sampling=SamplingParams(0.8, 0.9), seed=7)
            runs.append([e.token_id async for e in decoder.stream(PROMPTS[0], opts)])
        await link.aclose()
    assert runs[0] == runs[1]


def test_unsafe_bind_and_bad_token_files_are_refused(tmp_path) -> None:
    with pytest.raises(AuthConfigError, match="0.0.0.0"):
        check_bind("0.0.0.0", None)
    check_bind("127.0.0.1", None)
    check_bind("0.0.0.0", "t")
    with pytest.raises(AuthConfigError, match="cannot read"):
        read_tokens(tmp_path / "missing")
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(AuthConfigError, match="empty"):
        read_tokens(tmp_path / "empty")
    (tmp_path / "t").write_text("abc\n")
    assert read_tokens(tmp_path / "t") == ["abc"]
    with pytest.raises(LinkConfigError):
        edge_url("http:/nowhere")
    assert edge_url("http://h:1") == "ws://h:1/v1/edge" and edge_url("wss://h:1/x") == "wss://h:1/x"


async def open_sessions(cloud, names: list[str], token: str | None = None) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse, list[p.Frame]]:
    """A raw connection that says hello and opens `names`; returns it with the replies (Opened or Error)."""
    session, ws = await raw_ws(cloud, {"Authorization": f"Bearer {token}"} if token else None)
    m = cloud.manifest()
    await ws.send_bytes(p.encode_frame(p.Hello(p.PROTOCOL_VERSION, m["model_fingerprint"], m["exit_layer"], m["hidden_size"])))
    assert isinstance(await recv(ws), p.Welcome)
    replies = []
    for i, name in enumerate(names):
        await ws.send_bytes(p.encode_frame(p.Open(i + 1, name, "fp32")))
        replies.append(await recv(ws))
    return session, ws, replies


async def test_sessions_a_dead_edge_abandoned_do_not_lock_its_token_out(model) -> None:
    """Issue 14, defect 1: sessions of a crashed edge (no Close) used to count against the per-client limit until
    the cloud restarted. Without auth every edge shares one owner, so every edge was locked out."""
    async with running_cloud(model, max_sessions_per_client=2) as cloud:
        crashed, ws, replies = await open_sessions(cloud, ["a", "b"])
        assert all(isinstance(r, p.Opened) for r in replies)
        await crashed.close()  # the edge dies: no Close frames
        for _ in range(50):
            if not cloud.state.connections:
                break
            await asyncio.sleep(0.02)
        fresh, ws, replies = await open_sessions(cloud, ["c", "d", "e"])
        assert isinstance(replies[0], p.Opened) and isinstance(replies[1], p.Opened)
        # a live connection's sessions are not abandoned: the limit still holds for it
        assert isinstance(replies[2], p.Error) and replies[2].code == p.TOO_MANY_SESSIONS
        assert sorted(c.session_id for c in cloud.state.contexts.sessions()) == ["c", "d"]
        await fresh.close()


async def test_cloud_only_completions_survive_kv_pressure_under_one_budget(model, edge_runtime) -> None:
    """Issue 14, defect 2: a running completion evicted under KV pressure used to fail (500 or a cut stream), and
    completions had a budget of their own beside the edge sessions'. Now one table, one budget, and an evicted
    completion rebuilds its context from its own tokens."""
    budget_mb = 0.03
    async with running_cloud(model, kv_budget_mb=budget_mb) as cloud, aiohttp.ClientSession() as http:
        link = cloud.link("fp32")

        async def complete(prompt):
            async with http.post(cloud.http_url + "/v1/completions", json={"prompt": prompt, "max_tokens": 12}) as resp:
                assert resp.status == 200, await resp.text()
                return (await resp.json())["choices"][0]["token_ids"]

        prompts = [PROMPTS[i % len(PROMPTS)] + [i] for i in range(4)]
        edge_runs = [generate(edge_runtime(), link, PROMPTS[1] + [i], 10) for i in range(2)]
        results = await asyncio.gather(*(complete(pr) for pr in prompts), *edge_runs)
        await link.aclose()
        assert cloud.state.contexts.evictions > 0
        assert cloud.state.contexts.nbytes <= budget_mb * (1 << 20)
        async with http.get(cloud.http_url + "/healthz") as resp:
            assert (await resp.json())["kv_budget_bytes"] == int(budget_mb * (1 << 20))
    for prompt, tokens in zip(prompts, results[:4]):
        assert tokens == full_greedy(model, prompt, 12)
    for i, (tokens, sources, _) in enumerate(results[4:]):
        assert tokens == full_greedy(model, PROMPTS[1] + [i], 10) and set(sources) == {CLOUD}
