"""Bad input against a live edge daemon: hypothesis sends mutated OpenAI requests over real HTTP.

A daemon (tests/edge/conftest.py's `start_daemon`, in-process on a loopback port) serves a tiny random model
with a word-level tokenizer, so valid requests finish in milliseconds. Each request is a valid body, or one
with a known defect: malformed or truncated JSON, invalid UTF-8, a field of the wrong type, an absurd
`max_tokens`, a prompt over the context or over the body limit, a wrong Content-Type. A defect must get 400
(413 for a body over the limit) with an OpenAI error body {"error": {"message", "type", "param", "code"}}
naming the code (and the field, where there is one); a valid body gets 200; nothing gets a 5xx; the daemon
keeps serving and holds no session afterwards. Requests tried are tallied in the terminal summary.

The Content-Type is not checked: the body is judged by its bytes, since `curl -d` sends JSON as
application/x-www-form-urlencoded by default. Parse-level fuzzing without HTTP is in
tests/edge/test_openai_api.py; a few fixed bad requests over HTTP on the real model in tests/edge/test_daemon.py.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offramp.edge.config import EdgeConfig
from offramp.edge.service import EdgeService
from tests.conftest import save_tiny_checkpoint
from tests.edge.conftest import http, sse_events, start_daemon
from tests.reliability.fuzz_tally import fuzz_tally as tally_for

CONTEXT = 256  # the tiny model's max positions
MAX_TOKENS_LIMIT = 16
BODY_LIMIT = 64 << 10
EXAMPLES = int(os.environ.get("OFFRAMP_FUZZ_EXAMPLES", "800"))
ERROR_FIELDS = {"message", "type", "param", "code"}
WORDS = [f"t{i}" for i in range(128)]


@pytest.fixture(scope="module")
def fuzz_tally(pytestconfig: pytest.Config) -> Counter[str]:
    return tally_for(pytestconfig)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    from offramp.models import load_model
    from offramp.models.edge_dir import export_edge_dir

    checkpoint = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"), num_layers=4, seed=7)
    model, tokenizer = load_model(str(checkpoint))
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    edge_dir = export_edge_dir(model, tokenizer, str(checkpoint), 2, tmp_path_factory.mktemp("tiny-edge"), ["fp32"], None, progress=False)
    service = EdgeService.open(EdgeConfig(edge=edge_dir, cloud="none", precision="fp32", max_sessions=4, workers=1))
    server = start_daemon(service, max_tokens_limit=MAX_TOKENS_LIMIT, default_max_tokens=4, max_body_bytes=BODY_LIMIT,
                          served_model_name="tiny")
    server.service = service
    yield server
    server.stop()
    asyncio.run(service.aclose())


# -- bodies -----------------------------------------------------------------------------------------------------

words = st.lists(st.sampled_from(WORDS), min_size=1, max_size=12).map(" ".join)
token_ids = st.lists(st.integers(0, 127), min_size=1, max_size=20)


@st.composite
def valid_body(draw: st.DrawFn, chat: bool) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if chat:
        roles = st.sampled_from(["system", "developer", "user", "assistant"])
        content = words | st.lists(words.map(lambda t: {"type": "text", "text": t}), min_size=1, max_size=3)
        body["messages"] = draw(st.lists(st.fixed_dictionaries({"role": roles, "content": content}), min_size=1, max_size=4))
    else:
        body["prompt"] = draw(words | token_ids | words.map(lambda t: [t]))
    optional = {
        "model": st.sampled_from(["default", "tiny", None]),
        "max_tokens": st.integers(1, MAX_TOKENS_LIMIT) | st.none(),
        "temperature": st.floats(0, 2) | st.none(),
        "top_p": st.floats(0.01, 1) | st.none(),
        "seed": st.integers(0, 2**63 - 1) | st.none(),
        "stop": st.none() | words | st.lists(words, max_size=4),
        "stream": st.booleans(),
        "n": st.just(1),
    }
    for name in draw(st.lists(st.sampled_from(sorted(optional)), unique=True, max_size=5)):
        body[name] = draw(optional[name])
    if body.get("stream") and draw(st.booleans()):
        body["stream_options"] = {"include_usage": draw(st.booleans())}
    return body


# Values of the wrong JSON type for each field (null means "not given", so it is never here).
NOT_INT = st.one_of(st.text(max_size=5), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.lists(st.integers(), max_size=2),
                    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
NOT_NUMBER = st.one_of(st.text(max_size=5), st.booleans(), st.lists(st.floats(allow_nan=False, allow_infinity=False), max_size=2), st.just({}))
NOT_STR = st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.just({}))
NOT_BOOL = st.one_of(st.integers(), st.text(max_size=5), st.floats(allow_nan=False, allow_infinity=False), st.just([]))
WRONG_TYPES = {
    "model": NOT_STR, "max_tokens": NOT_INT, "seed": NOT_INT, "n": NOT_INT, "temperature": NOT_NUMBER, "top_p": NOT_NUMBER,
    "stream": NOT_BOOL, "stop": st.one_of(st.integers(), st.just({}), st.lists(st.integers(), min_size=1, max_size=2)),
    "stream_options": st.one_of(st.integers(), st.text(max_size=3), st.lists(st.integers(), max_size=2)),
    "prompt": st.one_of(st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.just({}),
                        st.lists(st.booleans() | st.floats(allow_nan=False), min_size=1, max_size=3)),
    "messages": st.one_of(st.integers(), st.text(max_size=5), st.just({}), st.just([]), st.lists(st.integers() | st.text(max_size=3), min_size=1, max_size=2)),
}
ABSURD_MAX_TOKENS = st.one_of(st.integers(max_value=0), st.integers(MAX_TOKENS_LIMIT + 1, 2**70))
BAD_UTF8 = [b"\xff", b"\xfe", b"\xc3\x28", b"\xa0\xa1", b"\xe2\x28\xa1", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf8\x88\x80\x80\x80", b"\x80"]
CONTENT_TYPES = ["application/json", "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/octet-stream", "application/json; charset=latin-1", None]


def case(data: st.DataObject) -> tuple[str, str, bytes, str | None, tuple[int, str | None, str | None]]:
    """(class, path, body, content type, (status, error code or None, param or None)); a code of "*" takes any."""
    chat = data.draw(st.booleans(), label="chat")
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = data.draw(valid_body(chat), label="valid body")
    ctype = data.draw(st.sampled_from(CONTENT_TYPES), label="content type")
    kind = data.draw(st.sampled_from(["valid", "malformed_json", "truncated_json", "not_an_object", "invalid_utf8", "wrong_type",
                                      "absurd_max_tokens", "huge_prompt", "over_body_limit", "bad_token_id", "non_finite"]), label="kind")
    raw = json.dumps(body).encode()
    if kind == "valid":
        return kind, path, raw, ctype, (200, None, None)
    if kind == "malformed_json":
        junk = data.draw(st.sampled_from([b"{", b"{'prompt': 'x'}", b'{"prompt": "x",}', b"{prompt: 1}", b"nul", b"", b"   ", b"[1,"]), label="junk")
        return kind, path, junk, ctype, (400, "invalid_json", None)
    if kind == "truncated_json":
        return kind, path, raw[: data.draw(st.integers(0, len(raw) - 1), label="cut")], ctype, (400, "invalid_json", None)
    if kind == "not_an_object":
        value = data.draw(st.one_of(st.lists(st.integers(), max_size=3), st.text(max_size=5), st.integers(), st.booleans(), st.none()), label="value")
        return kind, path, json.dumps(value).encode(), ctype, (400, "invalid_json", None)
    if kind == "invalid_utf8":
        at = data.draw(st.integers(0, len(raw)), label="at")
        return kind, path, raw[:at] + data.draw(st.sampled_from(BAD_UTF8), label="bytes") + raw[at:], ctype, (400, "invalid_utf8", None)
    if kind == "non_finite":
        name = data.draw(st.sampled_from(["temperature", "top_p", "max_tokens", "seed"]), label="field")
        text = raw.decode()[:-1] + f', "{name}": {data.draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]), label="constant")}}}'
        return kind, path, text.encode(), ctype, (400, "invalid_json", None)
    if kind == "wrong_type":
        fields = ["model", "max_tokens", "seed", "n", "temperature", "top_p", "stream", "stop", "stream_options", "messages" if chat else "prompt"]
        name = data.draw(st.sampled_from(fields), label="field")
        body[name] = data.draw(WRONG_TYPES[name], label="wrong value")
        body.pop("stream_options", None) if name == "stream" else None
        param = "messages" if name == "messages" else name
        # an array of wrong messages names the bad element (messages[i]...)
        code = "invalid_type" if not (chat and name == "messages" and isinstance(body[name], list) and body[name]) else "*"
        return kind, path, json.dumps(body).encode(), ctype, (400, code, param if code != "*" else "*")
    if kind == "absurd_max_tokens":
        name = "max_completion_tokens" if chat and data.draw(st.booleans(), label="new name") else "max_tokens"
        body[name] = value = data.draw(ABSURD_MAX_TOKENS, label="max_tokens")
        return kind, path, json.dumps(body).encode(), ctype, (400, "invalid_value" if value < 1 else "max_tokens_exceeded", name)
    if kind == "bad_token_id" and not chat:  # (chat has no token ids: it gets a huge prompt instead)
        body["prompt"] = data.draw(token_ids, label="ids") + [data.draw(st.integers(128, 2**62) | st.integers(-(2**62), -1), label="bad id")]
        return kind, path, json.dumps(body).encode(), ctype, (400, "invalid_value", "prompt")
    if kind == "over_body_limit":
        filler = " ".join(["t1"] * (BODY_LIMIT // 3 + data.draw(st.integers(1, 2000), label="extra")))
        body = {"messages": [{"role": "user", "content": filler}]} if chat else {"prompt": filler}
        return kind, path, json.dumps(body).encode(), ctype, (413, "request_too_large", None)
    # a prompt over the context length (a string of words or, completions, token ids), within the body limit
    n = data.draw(st.integers(CONTEXT, 4 * CONTEXT), label="prompt tokens")
    if chat:
        body["messages"] = [{"role": "user", "content": " ".join(["t5"] * n)}]
    else:
        body["prompt"] = data.draw(st.sampled_from([" ".join(["t5"] * n), [5] * n]), label="prompt")
    body.pop("max_tokens", None)
    return "huge_prompt", path, json.dumps(body).encode(), ctype, (400, "context_length_exceeded", None)


def check(status: int, answer: Any, expected: tuple[int, str | None, str | None], body: bytes) -> None:
    want_status, want_code, want_param = expected
    assert status == want_status, (status, answer, body[:300])
    if status == 200:
        if isinstance(answer, str):  # a stream
            events = sse_events(answer)
            assert events[-1] == "[DONE]" and all(isinstance(e, dict) and "error" not in e for e in events[:-1]), answer[-300:]
        else:
            assert answer["choices"][0]["finish_reason"] in ("stop", "length") and 1 <= answer["usage"]["completion_tokens"] <= MAX_TOKENS_LIMIT
        return
    assert isinstance(answer, dict) and set(answer) == {"error"} and set(answer["error"]) == ERROR_FIELDS, answer
    error = answer["error"]
    assert error["message"] and error["type"] == "invalid_request_error", error
    if want_code != "*":
        assert error["code"] == want_code, (error, body[:300])
    if want_param not in (None, "*"):
        assert error["param"] == want_param, (error, body[:300])


def test_fuzzed_requests_get_openai_errors_and_the_daemon_keeps_serving(daemon, fuzz_tally) -> None:
    tried: Counter[str] = Counter()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def one_request(data: st.DataObject) -> None:
        kind, path, body, ctype, expected = case(data)
        fuzz_tally["daemon requests"] += 1
        tried[kind] += 1
        status, answer = http("POST", daemon.base_url + path, body, {"Content-Type": ctype} if ctype else {})
        check(status, answer, expected, body)

    one_request()
    assert daemon.service.pool.active == 0  # every generation, finished or refused, gave its session back
    status, health = http("GET", daemon.base_url + "/healthz")
    assert status == 200 and health["status"] == "ok"
    status, done = http("POST", daemon.base_url + "/v1/completions", {"prompt": "t1 t2 t3", "max_tokens": 3, "temperature": 0})
    assert status == 200 and done["usage"]["completion_tokens"] == 3
    assert {"valid", "invalid_utf8", "wrong_type", "huge_prompt", "over_body_limit"} <= set(tried), tried
    print(f"daemon fuzz: {sum(tried.values())} requests by kind {dict(sorted(tried.items()))}")


def test_non_finite_and_absurd_numbers_in_every_numeric_field(daemon, fuzz_tally) -> None:
    """JSON has no NaN/Infinity, and a number too large for a float is a value error, not a crash."""
    for name in ("temperature", "top_p", "max_tokens", "seed", "n"):
        for literal, code in (("NaN", "invalid_json"), ("-Infinity", "invalid_json"), ("1e999", None), ("1" + "0" * 400, None)):
            raw = ('{"prompt": "t1", "%s": %s}' % (name, literal)).encode()
            fuzz_tally["daemon requests"] += 1
            status, answer = http("POST", daemon.base_url + "/v1/completions", raw)
            assert status == 400 and set(answer["error"]) == ERROR_FIELDS, (name, literal, answer)
            if code:
                assert answer["error"]["code"] == code
            else:
                assert answer["error"]["param"] == name, (name, literal, answer)
