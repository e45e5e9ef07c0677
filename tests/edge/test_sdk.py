"""The Python SDK: Client and AsyncClient against an in-process daemon, LocalEngine without one."""

from __future__ import annotations

import pytest

from offramp.cloud.full_model import FullModelRunner
from offramp.edge import AsyncClient, Client, ClientError, Completion, LocalEngine
from tests.edge.conftest import REQUEST_TIMEOUT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

QUESTION = "What is gravity?"


def test_sync_client_generates_and_streams(collab_daemon, collab_service, default_model) -> None:
    client = Client(collab_daemon.base_url, timeout=REQUEST_TIMEOUT)
    assert client.models() == ["SmolLM2-135M-Instruct"]
    assert client.health()["cloud"]["state"] == "up"
    done = client.generate(QUESTION, chat=True, max_tokens=10)
    assert isinstance(done, Completion) and done.text and done.mode == "collaborative"
    assert len(done.sources) == len(done.token_ids) == done.usage["completion_tokens"] <= 10
    assert done.stats["escalations"] == len(done.sources) and "bytes_up" in done.stats
    prompt_ids = collab_service.encode_chat([{"role": "user", "content": QUESTION}])
    assert done.token_ids == list(FullModelRunner(default_model[0]).generate_ids(prompt_ids, 10, stop_ids=collab_service.stop_ids))

    stream = client.stream(QUESTION, chat=True, max_tokens=10)
    pieces = list(stream)
    assert len(pieces) > 1 and "".join(pieces) == done.text
    assert stream.completion is not None and stream.completion.token_ids == done.token_ids
    assert stream.completion.stats["tokens"] == len(done.token_ids)


def test_sync_client_raises_openai_errors(standalone_daemon) -> None:
    client = Client(standalone_daemon.base_url, timeout=REQUEST_TIMEOUT)
    with pytest.raises(ClientError) as info:
        client.generate("hi", max_tokens=10**9)
    assert info.value.status == 400 and info.value.code == "max_tokens_exceeded"
    with pytest.raises(ClientError, match="cannot reach"):
        Client("http://127.0.0.1:9", timeout=5).health()
    with pytest.raises(TypeError):
        client.generate([{"role": "user", "content": "hi"}])  # messages need chat=True


async def test_async_client_generates_and_streams(standalone_daemon) -> None:
    async with AsyncClient(standalone_daemon.base_url, timeout=REQUEST_TIMEOUT) as client:
        assert (await client.health())["edge"]["mode"] == "edge-standalone"
        done = await client.generate("The capital of France is", max_tokens=6, stop=["\n"])
        assert done.mode == "edge-standalone" and set(done.sources) == {"edge"}
        stream = client.stream("The capital of France is", max_tokens=6, stop=["\n"])
        pieces = [piece async for piece in stream]
        assert "".join(pieces) == done.text and stream.completion.token_ids == done.token_ids
        with pytest.raises(ClientError) as info:
            await client.generate([{"role": "user", "content": "hi"}], chat=True, system="x" * 10, max_tokens=0)
        assert info.value.status == 400


def test_local_engine_matches_the_daemon(default_edge_dir, standalone_daemon) -> None:
    with LocalEngine(edge=default_edge_dir, cloud="none", precision="fp32") as engine:
        done = engine.generate(QUESTION, chat=True, max_tokens=8)
        remote = Client(standalone_daemon.base_url, timeout=REQUEST_TIMEOUT).generate(QUESTION, chat=True, max_tokens=8)
        assert done.token_ids == remote.token_ids and done.text == remote.text
        assert done.sources == remote.sources and done.mode == "edge-standalone"
        stream = engine.stream(QUESTION, chat=True, max_tokens=8)
        assert "".join(stream) == done.text and stream.completion.usage == done.usage
        with pytest.raises(ValueError, match="context length"):
            engine.generate("word " * 9000)


async def test_local_engine_async_with_in_process_cloud(default_edge_dir, default_model) -> None:
    with LocalEngine(edge=default_edge_dir, cloud="local", codec="fp32", threshold=2.0, loaded=default_model) as engine:
        stream = engine.astream(QUESTION, chat=True, max_tokens=6)
        pieces = [piece async for piece in stream]
        assert "".join(pieces) == stream.completion.text
        assert set(stream.completion.sources) == {"cloud"} and stream.completion.stats["bytes_up"] > 0
        again = await engine.agenerate(QUESTION, chat=True, max_tokens=6)
        assert again.token_ids == stream.completion.token_ids
