"""The edge's cloud link against real loopback servers: one request's timeout leaves the shared link up (issue 14
defect 5), bytes are each request's own frames, the same for the in-process and the WebSocket cloud (defect
6), and a refusal is an error at start-up or in the request, never fallback tokens (defect 8)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import numpy as np
import pytest
from aiohttp import web

from offramp.edge.config import EdgeConfig
from offramp.edge.decode_loop import CLOUD, FALLBACK
from offramp.edge.link import CloudRefusedError, CloudTimeoutError, CloudUnavailableError
from offramp.edge.local import LocalEngine
from offramp.edge.request_link import LinkHealth, RequestLink
from offramp.edge.service import EdgeService
from offramp.edge.text_stream import TextRequest
from offramp.edge.ws_link import WebSocketCloudLink
from offramp.models import load_model
from offramp.models.edge_dir import export_edge_dir
from offramp.shared import protocol as p
from offramp.shared.contract import ExtendRequest
from offramp.shared.sampling import SamplingParams
from tests.cloud.conftest import running_cloud
from tests.conftest import save_tiny_checkpoint
from tests.edge.conftest import http, start_daemon
from tests.edge.fakes import FakeCloudLink

K = 2
HIDDEN = 64
MANIFEST = {"model_fingerprint": "f" * 64, "exit_layer": K, "hidden_size": HIDDEN, "num_layers": 4}


@contextlib.asynccontextmanager
async def scripted_cloud(silent_sessions: set[str]) -> AsyncIterator[str]:
    """A protocol-speaking WebSocket server that never answers escalations of `silent_sessions` (a slow request)."""

    async def edge(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            frame = p.decode_frame(msg.data)
            if isinstance(frame, p.Hello):
                reply: p.Frame | None = p.Welcome(p.PROTOCOL_VERSION, "scripted", 2, 256, ["fp32"], p.DEFAULT_MAX_FRAME_BYTES)
            elif isinstance(frame, p.Open):
                reply = p.Opened(frame.id, frame.session, 0)
            elif isinstance(frame, p.Extend):
                end = frame.start + frame.rows
                reply = None if frame.session in silent_sessions else p.Result(
                    frame.id, frame.session, frame.epoch, frame.start, [1] * frame.rows, [0.0] * frame.rows, 0, 1, end)
            else:
                reply = p.Closed(frame.id, frame.session)
            if reply is not None:
                await ws.send_bytes(p.encode_frame(reply))
        return ws

    app = web.Application()
    app.router.add_get(p.EDGE_PATH, edge)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"ws://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


def rows(n: int = 1) -> np.ndarray:
    return np.ones((n, HIDDEN), dtype=np.float32)


async def test_one_requests_timeout_leaves_the_shared_link_up_for_the_others() -> None:
    async with scripted_cloud({"slow"}) as url:
        link = WebSocketCloudLink(url, codec="fp32", manifest=MANIFEST, timeout_s=1.0, backoff_s=(30.0, 30.0))
        health = LinkHealth("ws", url)
        slow, fast = RequestLink(link, health), RequestLink(link, health)
        await slow.open_session("slow")
        await fast.open_session("fast")
        late = asyncio.ensure_future(slow.extend(ExtendRequest("slow", 0, rows(), want_token=True)))
        await asyncio.sleep(0)
        await fast.extend(ExtendRequest("fast", 0, rows(), want_token=True))  # answered while "slow" waits
        with pytest.raises(CloudTimeoutError):
            await late
        # the very next call of another request goes through: no back-off, the link is not down
        result = await fast.extend(ExtendRequest("fast", 1, rows(), want_token=True))
        assert result.length == 2 and link.state == "up"
        assert health.state == "up" and health.timeouts == 1 and health.failures == 0
        await link.aclose()


async def test_a_silent_link_still_backs_off() -> None:
    """Nothing at all came back while the request waited: the link is bad, and the next calls fall back at once."""
    async with scripted_cloud({"slow"}) as url:
        link = WebSocketCloudLink(url, codec="fp32", manifest=MANIFEST, timeout_s=0.5, backoff_s=(30.0, 30.0))
        await link.open_session("slow")
        with pytest.raises(CloudUnavailableError) as err:
            await link.extend(ExtendRequest("slow", 0, rows(), want_token=True))
        assert not isinstance(err.value, CloudTimeoutError)
        with pytest.raises(CloudUnavailableError, match="next try"):
            await link.open_session("other")
        await link.aclose()


# -- against a real cloud on the tiny model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny checkpoint, its loaded model (the cloud's) and its exported edge directory (the edge's)."""
    root = tmp_path_factory.mktemp("tiny-link")
    checkpoint = save_tiny_checkpoint(root / "ckpt", num_layers=4, seed=11)
    model, tokenizer = load_model(str(checkpoint))
    edge_dir = export_edge_dir(model, tokenizer, str(checkpoint), K, root / "edge", ["fp32"], None, progress=False)
    other = save_tiny_checkpoint(root / "other", num_layers=4, seed=12)
    other_model, other_tokenizer = load_model(str(other))
    other_dir = export_edge_dir(other_model, other_tokenizer, str(other), K, root / "other-edge", ["fp32"], None, progress=False)
    return model, edge_dir, other_dir


def service(edge_dir, cloud: str, **fields) -> EdgeService:
    return EdgeService.open(EdgeConfig(edge=edge_dir, precision="fp32", cloud=cloud, codec="fp32", threshold=2.0, workers=2, **fields))


async def collect(svc: EdgeService, prompt: list[int], n: int):
    return await svc.generate(TextRequest(prompt, n)).collect()


async def test_bytes_are_each_requests_own_frames_and_the_same_in_process_and_over_the_wire(tiny) -> None:
    model, edge_dir, _ = tiny
    prompt = [5, 17, 3, 99, 42, 8]
    async with running_cloud(model) as cloud:
        ws = service(edge_dir, cloud.url, max_sessions=4)
        local = EdgeService.open(EdgeConfig(edge=edge_dir, precision="fp32", cloud="local", codec="fp32", threshold=2.0), loaded=(model, None))
        try:
            alone_ws, alone_local = await collect(ws, prompt, 12), await collect(local, prompt, 12)
            assert alone_ws.token_ids == alone_local.token_ids and set(alone_ws.sources) == {CLOUD}
            assert (alone_ws.stats.bytes_up, alone_ws.stats.bytes_down) == (alone_local.stats.bytes_up, alone_local.stats.bytes_down)
            payload = (len(prompt) + 11) * HIDDEN * 4  # fp32 rows of every position but the last token's
            assert payload < alone_ws.stats.bytes_up < payload + 220 * 14  # + msgpack framing of 14 frames (field names included)
            before = (ws.link.stats.bytes_up, ws.link.stats.bytes_down)
            together = await asyncio.gather(*(collect(ws, [3 + i, 40, 7], 10) for i in range(3)))
            spent = (ws.link.stats.bytes_up - before[0], ws.link.stats.bytes_down - before[1])
            assert (sum(r.stats.bytes_up for r in together), sum(r.stats.bytes_down for r in together)) == spent
            assert len({r.stats.bytes_down for r in together}) == 1  # same shapes, same bytes: none counts another's
        finally:
            await ws.aclose()
            await local.aclose()


async def test_a_wrong_token_or_another_model_fails_start_up_with_the_clouds_message(tiny) -> None:
    model, edge_dir, other_dir = tiny
    async with running_cloud(model, token="s3cret") as cloud:
        for edge, token, code in ((edge_dir, "wrong", p.UNAUTHORIZED), (other_dir, "s3cret", p.MODEL_MISMATCH)):
            svc = service(edge, cloud.url, cloud_token=token)
            try:
                with pytest.raises(CloudRefusedError) as err:
                    await svc.check_cloud()
                assert err.value.code == code and svc.health.state != "up"
            finally:
                await svc.aclose()
        with pytest.raises(CloudRefusedError, match="unauthorized"):
            await asyncio.to_thread(LocalEngine, edge=edge_dir, precision="fp32", cloud=cloud.url, cloud_token="wrong")
        good = service(edge_dir, cloud.url, cloud_token="s3cret")
        try:
            await good.check_cloud()
            result = await collect(good, [5, 6, 7], 4)
            assert set(result.sources) == {CLOUD}
        finally:
            await good.aclose()


async def test_an_unreachable_cloud_still_means_fallback_tokens(tiny) -> None:
    _, edge_dir, _ = tiny
    async with running_cloud(tiny[0]) as cloud:
        url = cloud.url
    svc = service(edge_dir, url)  # the cloud is gone now
    try:
        await svc.check_cloud()  # no error: the edge serves alone until the cloud is back
        result = await collect(svc, [5, 6, 7], 4)
        assert result.sources == [FALLBACK] * 4 and svc.health.state == "down"
    finally:
        await svc.aclose()


def test_the_daemon_answers_a_refusal_mid_request_with_an_error_naming_it(tiny) -> None:
    _, edge_dir, _ = tiny
    link = FakeCloudLink(scripted_rows=False)
    svc = EdgeService.open(EdgeConfig(edge=edge_dir, precision="fp32", cloud="local", threshold=2.0, workers=1), link=link)
    server = start_daemon(svc)
    try:
        link.refuse = p.FORBIDDEN
        status, body = http("POST", server.base_url + "/v1/completions", {"prompt": "t1 t2", "max_tokens": 3})
        assert status == 502 and body["error"]["code"] == "cloud_forbidden" and "refused by the test" in body["error"]["message"]
        status, text = http("POST", server.base_url + "/v1/completions", {"prompt": "t1 t2", "max_tokens": 3, "stream": True})
        assert status == 200 and "cloud_forbidden" in text and text.rstrip().endswith("[DONE]")
        link.refuse = None
        status, body = http("POST", server.base_url + "/v1/completions", {"prompt": "t1 t2", "max_tokens": 3})
        assert status == 200 and body["offramp"]["sources"] == ["cloud"] * 3
    finally:
        server.stop()
        asyncio.run(svc.aclose())
