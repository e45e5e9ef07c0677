"""The daemon's OpenAI surface through two real clients, the official `openai` package and langchain-openai's
`ChatOpenAI`: log-probs (the full model's where the cloud decided, the exit head's where the edge did),
stream_options.include_usage, max_completion_tokens, and refusals surfacing as the clients' own errors."""

from __future__ import annotations

import math

import openai
import pytest
import torch
from langchain_openai import ChatOpenAI

from offramp.edge.decode_loop import EXIT_HEAD, FULL_MODEL
from tests.edge.conftest import REQUEST_TIMEOUT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

MODEL = "SmolLM2-135M-Instruct"
MESSAGES = [{"role": "user", "content": "What is gravity?"}]


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="unused", timeout=REQUEST_TIMEOUT, max_retries=0)


def chat_model(server, **kwargs) -> ChatOpenAI:
    return ChatOpenAI(model=MODEL, base_url=server.base_url + "/v1", api_key="unused", temperature=0, timeout=REQUEST_TIMEOUT,
                      max_retries=0, **kwargs)


def test_chat_logprobs_are_the_full_models_where_the_cloud_decided(collab_daemon, collab_service, default_model) -> None:
    """Every token is the cloud's here (threshold > 1): its log-prob and alternatives are the full model's own,
    as a forward pass of the whole model over prompt + answer gives them."""
    done = client(collab_daemon).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_completion_tokens=4, temperature=0, logprobs=True, top_logprobs=3
    )
    content = done.choices[0].logprobs.content
    ids = done.offramp["token_ids"]
    assert len(content) == len(ids) == done.usage.completion_tokens <= 4
    assert done.offramp["logprob_sources"] == [FULL_MODEL] * len(ids) and set(done.offramp["sources"]) == {"cloud"}
    prompt = collab_service.encode_chat(MESSAGES)
    with torch.inference_mode():
        logits = default_model[0](torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float()
    reference = torch.log_softmax(logits, dim=-1)
    for i, entry in enumerate(content):
        assert math.isclose(entry.logprob, reference[i, ids[i]].item(), abs_tol=2e-3)
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token  # greedy: the chosen is the best
        assert entry.bytes == list(entry.token.encode())
    assert "".join(e.token for e in content).startswith(done.choices[0].message.content)


def test_completion_logprobs_are_the_heads_where_the_edge_decided_and_stream_alike(standalone_daemon) -> None:
    api = client(standalone_daemon)
    done = api.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2)
    lp = done.choices[0].logprobs
    assert done.offramp["logprob_sources"] == [EXIT_HEAD] * done.usage.completion_tokens == [EXIT_HEAD] * len(lp.tokens)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert logprob < 0 and top[token] == logprob == max(top.values()) and len(top) <= 3  # the alternatives and the chosen
    chunks = list(api.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=4, temperature=0, logprobs=2,
                                         stream=True, stream_options={"include_usage": True}))
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs]
    assert [t for s in streamed for t in s.tokens] == lp.tokens
    assert [v for s in streamed for v in s.token_logprobs] == lp.token_logprobs
    assert [o for s in streamed for o in s.text_offset] == lp.text_offset


def test_include_usage_counts_once_in_a_last_chunk(standalone_daemon) -> None:
    chunks = list(client(standalone_daemon).chat.completions.create(
        model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0, stream=True, stream_options={"include_usage": True}
    ))  # fmt: skip
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    assert all(c.usage is None for c in chunks[:-1])
    plain = list(client(standalone_daemon).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, temperature=0, stream=True))
    assert all(c.choices for c in plain)


@pytest.mark.parametrize(
    "fields, param",
    [
        ({"tools": [{"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"n": 2}, "n"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"logit_bias": {"42": 10}}, "logit_bias"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true
    ],
)
def test_unserved_fields_are_the_openai_clients_bad_request(standalone_daemon, fields, param) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client(standalone_daemon).chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2, **fields)
    assert info.value.status_code == 400 and info.value.param == param and param in info.value.message


def test_langchain_chat_openai_invokes_and_streams(collab_daemon) -> None:
    llm = chat_model(collab_daemon, max_completion_tokens=5, stream_usage=True)
    answer = llm.invoke("What is gravity?")
    assert answer.content and answer.response_metadata["finish_reason"] in ("stop", "length")
    assert 1 <= answer.usage_metadata["output_tokens"] <= 5 and answer.usage_metadata["input_tokens"] > 0
    chunks = list(llm.stream("What is gravity?"))
    total = chunks[0]
    for chunk in chunks[1:]:
        total += chunk
    assert total.content == answer.content  # greedy: the same answer either way
    assert total.usage_metadata == answer.usage_metadata  # include_usage: counted once, not once per usage-bearing chunk
    with_logprobs = chat_model(collab_daemon, max_completion_tokens=3, logprobs=True).invoke("What is gravity?")
    assert len(with_logprobs.response_metadata["logprobs"]["content"]) == with_logprobs.usage_metadata["output_tokens"]


def test_langchain_surfaces_a_refusal_as_bad_request(standalone_daemon) -> None:
    def now() -> str:
        """The time."""
        return "noon"

    with pytest.raises(openai.BadRequestError) as info:
        chat_model(standalone_daemon, max_completion_tokens=2).bind_tools([now]).invoke("What time is it?")
    assert info.value.status_code == 400 and info.value.param == "tools"
