"""Request validation and response shaping of the OpenAI surface, without a model; text assembly with a real tokenizer."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offramp.edge.daemon import DaemonConfig, DaemonConfigError, is_loopback
from offramp.edge.decode_loop import EXIT_HEAD, FULL_MODEL
from offramp.edge.openai_api import (
    APIError,
    ChunkShaper,
    Limits,
    LogprobShaper,
    parse_chat,
    parse_completion,
    parse_json_body,
    resolve_max_tokens,
)
from offramp.edge.text import TextAssembler
from offramp.edge.text_stream import TextDelta, TokenLogprob

LIMITS = Limits(served_model="m", context_length=100, max_tokens_limit=50, default_max_tokens=16)
VOCAB = 1000


def refused(call, *args) -> APIError:
    with pytest.raises(APIError) as info:
        call(*args)
    body = info.value.body()["error"]
    assert set(body) == {"message", "type", "param", "code"} and body["message"]
    return info.value


@pytest.mark.parametrize(
    "raw, code",
    [
        (b"{", "invalid_json"),
        (b"", "invalid_json"),
        (b"[1, 2]", "invalid_json"),
        (b'"text"', "invalid_json"),
        (b'{"prompt": NaN}', "invalid_json"),
        (b'{"prompt": "\xff\xfe"}', "invalid_utf8"),
        (b"\xc3\x28", "invalid_utf8"),
        (b"[" * 100_000, "invalid_json"),
    ],
)
def test_bad_bodies_are_refused(raw, code) -> None:
    assert refused(parse_json_body, raw).code == code


@pytest.mark.parametrize(
    "body, param, code",
    [
        ({}, "prompt", "missing_field"),
        ({"prompt": 5}, "prompt", "invalid_type"),
        ({"prompt": ""}, "prompt", "invalid_value"),
        ({"prompt": [1, 2, VOCAB]}, "prompt", "invalid_value"),
        ({"prompt": [1, True]}, "prompt", "invalid_type"),
        ({"prompt": ["a", "b"]}, "prompt", "invalid_type"),
        ({"prompt": "hi", "model": "gpt-4"}, "model", "model_not_found"),
        ({"prompt": "hi", "model": 3}, "model", "invalid_type"),
        ({"prompt": "hi", "max_tokens": "10"}, "max_tokens", "invalid_type"),
        ({"prompt": "hi", "max_tokens": True}, "max_tokens", "invalid_type"),
        ({"prompt": "hi", "max_tokens": 1.5}, "max_tokens", "invalid_type"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens", "invalid_value"),
        ({"prompt": "hi", "max_tokens": 51}, "max_tokens", "max_tokens_exceeded"),
        ({"prompt": "hi", "max_tokens": 10**30}, "max_tokens", "max_tokens_exceeded"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature", "invalid_type"),
        ({"prompt": "hi", "temperature": -0.1}, "temperature", "invalid_value"),
        ({"prompt": "hi", "temperature": 1e308 * 10}, "temperature", "invalid_value"),
        ({"prompt": "hi", "top_p": 0}, "top_p", "invalid_value"),
        ({"prompt": "hi", "top_p": 1.5}, "top_p", "invalid_value"),
        ({"prompt": "hi", "seed": -1}, "seed", "invalid_value"),
        ({"prompt": "hi", "seed": "7"}, "seed", "invalid_type"),
        ({"prompt": "hi", "stop": 3}, "stop", "invalid_type"),
        ({"prompt": "hi", "stop": ["a", 1]}, "stop", "invalid_type"),
        ({"prompt": "hi", "stop": ["a"] * 5}, "stop", "invalid_value"),
        ({"prompt": "hi", "stop": "x" * 1000}, "stop", "invalid_value"),
        ({"prompt": "hi", "stream": "yes"}, "stream", "invalid_type"),
        ({"prompt": "hi", "stream_options": []}, "stream_options", "invalid_type"),
        ({"prompt": "hi", "n": 2}, "n", "unsupported_value"),
        ({"prompt": "hi", "echo": True}, "echo", "unsupported_value"),
        ({"prompt": "hi", "best_of": 3}, "best_of", "unsupported_value"),
        ({"prompt": "hi", "logprobs": 21}, "logprobs", "invalid_value"),
        ({"prompt": "hi", "logprobs": True}, "logprobs", "invalid_type"),
        ({"prompt": "hi", "stream_options": {"include_usage": True}}, "stream_options", "invalid_value"),
        ({"prompt": "hi", "stream": True, "stream_options": {"include_obfuscation": False}}, "stream_options.include_obfuscation", "unsupported_field"),
        ({"prompt": "hi", "max_completion_tokens": 5}, "max_completion_tokens", "unsupported_field"),  # chat's name, not completions'
        ({"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty", "unsupported_value"),
        ({"prompt": "hi", "frequency_penalty": False}, "frequency_penalty", "unsupported_value"),
        ({"prompt": "hi", "logit_bias": {"50256": -100}}, "logit_bias", "unsupported_value"),
        ({"prompt": "hi", "suffix": "end"}, "suffix", "unsupported_field"),
        ({"prompt": "hi", "made_up_field": 1}, "made_up_field", "unsupported_field"),
    ],
)
def test_bad_completion_fields(body, param, code) -> None:
    err = refused(parse_completion, body, LIMITS, VOCAB)
    assert (err.param, err.code, err.status) == (param, code, 400)


@pytest.mark.parametrize(
    "body, code",
    [
        ({}, "invalid_type"),
        ({"messages": []}, "invalid_type"),
        ({"messages": "hi"}, "invalid_type"),
        ({"messages": ["hi"]}, "invalid_type"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "invalid_value"),
        ({"messages": [{"role": "user"}]}, "invalid_type"),
        ({"messages": [{"role": "user", "content": 5}]}, "invalid_type"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "invalid_type"),
        ({"messages": [{"role": "user", "content": "hi"}] * 300}, "invalid_value"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 99}, "max_tokens_exceeded"),
    ],
)
def test_bad_chat_fields(body, code) -> None:
    assert refused(parse_chat, body, LIMITS).code == code


HI = [{"role": "user", "content": "hi"}]
# Every field of OpenAI's chat request schema that the daemon does not serve, with a value a client would send.
UNSERVED_CHAT = {
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "tool_choice": "auto",
    "parallel_tool_calls": False,
    "functions": [{"name": "f", "parameters": {}}],
    "function_call": "auto",
    "response_format": {"type": "json_object"},
    "n": 2,
    "presence_penalty": 1.0,
    "frequency_penalty": -0.5,
    "logit_bias": {"42": 5},
    "store": True,
    "metadata": {"k": "v"},
    "modalities": ["text", "audio"],
    "audio": {"voice": "alloy", "format": "wav"},
    "prediction": {"type": "content", "content": "x"},
    "reasoning_effort": "low",
    "verbosity": "low",
    "web_search_options": {},
    "service_tier": "auto",
    "best_of": 2,
    "echo": True,
    "suffix": "x",
}


def test_caller_identifiers_are_served_as_labels() -> None:
    """user, safety_identifier and prompt_cache_key never change the output: applications send them routinely."""
    labels = {"user": "u-1", "safety_identifier": "s", "prompt_cache_key": "k"}
    assert parse_chat({"messages": HI, **labels}, LIMITS).messages
    err = refused(parse_chat, {"messages": HI, "user": {"id": 1}}, LIMITS)  # not a label
    assert (err.status, err.param) == (400, "user")


@pytest.mark.parametrize("name", sorted(UNSERVED_CHAT))
def test_every_unserved_chat_field_is_refused_by_name(name) -> None:
    err = refused(parse_chat, {"messages": HI, name: UNSERVED_CHAT[name]}, LIMITS)
    assert (err.status, err.param) == (400, name) and name in err.message
    assert err.code in ("unsupported_field", "unsupported_value")


@pytest.mark.parametrize(
    "message, param",
    [
        ({"role": "user", "content": "hi", "name": "ann"}, "messages[0].name"),
        ({"role": "assistant", "content": "", "tool_calls": [{"id": "1"}]}, "messages[0].tool_calls"),
        ({"role": "tool", "content": "42", "tool_call_id": "1"}, "messages[0].tool_call_id"),
    ],
)
def test_message_fields_beyond_role_and_content_are_refused(message, param) -> None:
    err = refused(parse_chat, {"messages": [message]}, LIMITS)
    assert (err.param, err.code) == (param, "unsupported_field") and param in err.message


def test_neutral_values_and_nulls_of_unserved_fields_are_served() -> None:
    """A zero penalty, an empty logit_bias, store=false or a null asks for nothing this server does not do."""
    body = {"messages": HI, "presence_penalty": 0, "frequency_penalty": 0.0, "logit_bias": {}, "store": False, "tools": None,
            "response_format": None, "n": 1}
    assert parse_chat(body, LIMITS).messages == HI


def test_logprob_fields_parse() -> None:
    assert (lambda p: (p.logprobs, p.top_logprobs))(parse_chat({"messages": HI}, LIMITS).params) == (False, 0)
    assert (lambda p: (p.logprobs, p.top_logprobs))(parse_chat({"messages": HI, "logprobs": True}, LIMITS).params) == (True, 0)
    chat = parse_chat({"messages": HI, "logprobs": True, "top_logprobs": 3}, LIMITS).params
    assert (chat.logprobs, chat.top_logprobs) == (True, 3)
    for bad, param in (({"top_logprobs": 2}, "top_logprobs"), ({"logprobs": False, "top_logprobs": 2}, "top_logprobs"),
                       ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"logprobs": 1}, "logprobs")):
        assert refused(parse_chat, {"messages": HI, **bad}, LIMITS).param == param
    completion = parse_completion({"prompt": "x", "logprobs": 0}, LIMITS, VOCAB).params
    assert (completion.logprobs, completion.top_logprobs) == (True, 0)
    completion = parse_completion({"prompt": "x", "logprobs": 5}, LIMITS, VOCAB).params
    assert (completion.logprobs, completion.top_logprobs) == (True, 5)
    assert not parse_completion({"prompt": "x", "logprobs": None}, LIMITS, VOCAB).params.logprobs


def test_max_completion_tokens_is_chats_budget_and_named_in_errors() -> None:
    params = parse_chat({"messages": HI, "max_completion_tokens": 20}, LIMITS).params
    assert params.max_tokens == 20
    err = refused(resolve_max_tokens, params, 90, LIMITS)
    assert err.param == "max_completion_tokens" and "max_completion_tokens" in err.message


TOKEN_BYTES = {1: b"Hi", 2: b" \xe6", 3: b"\x97\xa5", 4: b"!"}.__getitem__  # token 2 and 3 split one character


def test_chat_logprobs_shape() -> None:
    lps = [TokenLogprob(1, -0.1, [(1, -0.1), (4, -2.5)], FULL_MODEL), TokenLogprob(2, -1.0, [(2, -1.0), (1, -1.2)], EXIT_HEAD)]
    rendered = LogprobShaper(True, TOKEN_BYTES).render(lps)
    assert rendered["refusal"] is None
    first, second = rendered["content"]
    assert first == {"token": "Hi", "logprob": -0.1, "bytes": [72, 105],
                     "top_logprobs": [{"token": "Hi", "logprob": -0.1, "bytes": [72, 105]}, {"token": "!", "logprob": -2.5, "bytes": [33]}]}
    assert second["bytes"] == [32, 0xE6] and second["token"] == " \ufffd"  # the raw bytes survive a split character


def test_completion_logprobs_offsets_run_across_stream_chunks() -> None:
    shaper = LogprobShaper(False, TOKEN_BYTES)
    a = shaper.render([TokenLogprob(1, -0.1, [(4, -2.5)], FULL_MODEL)])
    b = shaper.render([TokenLogprob(4, -0.3, [], EXIT_HEAD), TokenLogprob(1, -0.2, [], EXIT_HEAD)])
    assert a == {"tokens": ["Hi"], "token_logprobs": [-0.1], "top_logprobs": [{"!": -2.5, "Hi": -0.1}], "text_offset": [0]}
    assert b["tokens"] == ["!", "Hi"] and b["text_offset"] == [2, 3] and b["top_logprobs"] == [{"!": -0.3}, {"Hi": -0.2}]


def test_chunks_carry_logprobs_and_their_sources() -> None:
    shaper = ChunkShaper.start(True, "m", include_usage=True, logprobs=LogprobShaper(True, TOKEN_BYTES))
    chunk = shaper.piece(TextDelta("Hi", [1], ["cloud"], [TokenLogprob(1, -0.1, [], FULL_MODEL)]))
    assert chunk["usage"] is None and chunk["offramp"]["logprob_sources"] == [FULL_MODEL]
    assert [e["token"] for e in chunk["choices"][0]["logprobs"]["content"]] == ["Hi"]
    plain = ChunkShaper.start(False, "m").piece(TextDelta("Hi", [1], ["edge"], [TokenLogprob(1, -0.1, [], EXIT_HEAD)]))
    assert plain["choices"][0]["logprobs"] is None and "usage" not in plain and "logprob_sources" not in plain["offramp"]


def test_good_requests_parse() -> None:
    req = parse_completion({"prompt": ["hello"], "model": "m", "max_tokens": 5, "stop": "\n", "seed": 3, "stream": True}, LIMITS, VOCAB)
    assert req.prompt == "hello" and req.params.max_tokens == 5 and req.params.stop == ("\n",) and req.params.stream
    assert parse_completion({"prompt": [1, 2, 3], "model": "default"}, LIMITS, VOCAB).prompt == [1, 2, 3]
    chat = parse_chat(
        {
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
            ],
            "temperature": None,  # null is "not given"
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        LIMITS,
    )
    assert chat.messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "ab"}]
    assert chat.params.include_usage and chat.params.temperature == LIMITS.default_temperature


def test_context_length_rules() -> None:
    params = parse_completion({"prompt": "x"}, LIMITS, VOCAB).params
    assert resolve_max_tokens(params, 90, LIMITS) == 10  # default 16 clipped to the room left
    assert resolve_max_tokens(params, 10, LIMITS) == 16
    assert refused(resolve_max_tokens, params, 100, LIMITS).code == "context_length_exceeded"
    params.max_tokens = 20
    assert refused(resolve_max_tokens, params, 90, LIMITS).code == "context_length_exceeded"


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(
    ["prompt", "messages", "model", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "n", "echo",
     "best_of", "logprobs", "top_logprobs", "tools", "presence_penalty", "logit_bias"]
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(field_names, json_values, max_size=6), st.booleans())
def test_any_json_object_parses_or_is_refused_cleanly(body, chat) -> None:
    """Whatever the field values, validation returns a request or raises APIError: nothing else escapes."""
    raw = json.dumps(body).encode()
    try:
        parsed = parse_json_body(raw)
        if chat:
            parse_chat(parsed, LIMITS)
        else:
            parse_completion(parsed, LIMITS, VOCAB)
    except APIError as exc:
        assert exc.status == 400 and exc.body()["error"]["type"] == "invalid_request_error"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_parse_or_are_refused_cleanly(raw) -> None:
    try:
        assert isinstance(parse_json_body(raw), dict)
    except APIError as exc:
        assert exc.code in {"invalid_json", "invalid_utf8"}


def test_bind_rules(tmp_path) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.3.2.1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4") and not is_loopback("example.com")
    with pytest.raises(DaemonConfigError, match="0.0.0.0"):
        DaemonConfig(host="0.0.0.0")
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    assert DaemonConfig(host="0.0.0.0", token_file=token).host == "0.0.0.0"


# -- text assembly: incremental detokenization and stop strings -----------------------------------------


@pytest.fixture(scope="module")
def tokenizer(default_model):
    return default_model[1]


def assemble(tokenizer, ids, stop=()):
    asm = TextAssembler(tokenizer, stop)
    pieces = [asm.add(i) for i in ids]
    pieces.append(asm.finish())
    return "".join(pieces), asm


@pytest.mark.parametrize("text", ["Hello, world! How are you?", "naïve café — 東京 🚀 done", "  spaces\n\nand\ttabs  "])
def test_assembled_text_equals_whole_decode(tokenizer, text) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    joined, asm = assemble(tokenizer, ids)
    assert joined == tokenizer.decode(ids, skip_special_tokens=True) == asm.text


def test_pieces_never_split_a_character(tokenizer) -> None:
    ids = tokenizer("🚀🚀 東京", add_special_tokens=False)["input_ids"]
    asm = TextAssembler(tokenizer)
    for i in ids:
        assert "\ufffd" not in asm.add(i)


@pytest.mark.parametrize(
    "text, stop, expected",
    [
        ("The answer is 42. Next question", ["."], "The answer is 42"),
        ("one\ntwo\nthree", ["\n"], "one"),
        ("alpha beta gamma delta", ["gamma", "beta"], "alpha "),
        ("no stop here", ["zzz"], "no stop here"),
        ("ends with a stop###", ["###"], "ends with a stop"),
        ("partial ## then ### done", ["###"], "partial ## then "),
    ],
)
def test_stop_strings_cut_text(tokenizer, text, stop, expected) -> None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    joined, asm = assemble(tokenizer, ids, stop)
    assert joined == expected == asm.text
    assert asm.stopped == (expected != text)
