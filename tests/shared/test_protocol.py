"""The wire protocol: every frame round-trips, and anything else fails as ProtocolError with a code, never worse."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from offramp.shared import protocol as p

EXAMPLES = [
    p.Hello(2, "ab" * 32, 15, 576, "edge"),
    p.Welcome(2, "offramp 0.1", 15, 8192, ["fp16", "fp32"], 1 << 20, "pid 7"),
    p.Open(1, "s", "fp16"),
    p.Opened(1, "s", 0, 3),
    p.Close(2, "s"),
    p.Closed(2, "s"),
    p.Extend(3, "s", 0, 0, 2, b"\x00" * 8, want_token=False),  # an upload
    p.Extend(4, "s", 1, 2, 1, b"\x00" * 4, temperature=0.7, top_p=0.9, seed=11),  # an escalation
    p.Extend(5, "s", 1, 2, 3, b"\x00" * 12, want_token=False, drafts=[7, 8, 9]),  # greedy verification
    p.Extend(6, "s", 1, 2, 3, b"\x00" * 12, drafts=[7, 8], q_support=2, q_ids=b"\x00" * 16, q_probs=b"\x00" * 16,
             temperature=1.0, seed=5, top_logprobs=3, rebase=True, base_epoch=2),  # sampled verification + a pick
    p.Result(4, "s", 1, 2, [5], [-0.5], 0, 5, 3, [-0.5]),
    p.Result(3, "s", 0, 0, [1, 2], [-0.1, -0.2], 0, None, 2),
    p.Result(6, "s", 2, 2, [7, 1, 4], [-0.1, -0.2, -0.3], 1, 1, 4, [-0.1, -0.9], [[7, 3], [1, 8]], [[-0.1, -2.5], [-0.2, -0.9]]),
    p.Stale(7, "s", 2, 4),
    p.Evicted(5, "s", 0, 0, "memory budget"),
    p.Error(0, "bad_frame", "what went wrong"),
]


@pytest.mark.parametrize("frame", EXAMPLES, ids=lambda f: f.type)
def test_every_frame_round_trips(frame) -> None:
    assert p.decode_frame(p.encode_frame(frame)) == frame


@pytest.mark.parametrize(
    "raw, words",
    [
        ({"type": "open", "id": 1, "session": 5, "codec": "fp16"}, "'session' must be str"),
        ({"type": "open", "id": -1, "session": "s", "codec": "fp16"}, "must be in 0.."),
        ({"type": "open", "id": True, "session": "s", "codec": "fp16"}, "'id' must be int"),
        ({"type": "open", "id": 1, "session": "", "codec": "fp16"}, "1..128 characters"),
        ({"type": "open", "id": 1, "session": "s" * 129, "codec": "fp16"}, "1..128 characters"),
        ({"type": "open", "id": 1, "session": "s"}, "missing fields ['codec']"),
        ({"type": "open", "id": 1, "session": "s", "codec": "fp16", "extra": 1}, "unknown fields ['extra']"),
        ({"type": "nope"}, "unknown frame type"),
        ({"id": 1}, "unknown frame type None"),
        ({"type": "extend", "id": 1, "session": "s", "epoch": 0, "start": 0, "rows": 0, "payload": b""}, "need more than 0 rows"),
        ({"type": "extend", "id": 1, "session": "s", "epoch": 0, "start": 0, "rows": 2, "payload": b"", "drafts": [1, 2]}, "2 drafts and a pick need more than 2 rows"),
        ({"type": "extend", "id": 1, "session": "s", "epoch": 0, "start": 0, "rows": 1, "payload": b"", "u": 0.5}, "unknown fields ['u']"),
        ({"type": "extend", "id": 1, "session": "s", "epoch": 0, "start": 0, "rows": 1, "payload": b"", "temperature": float("nan")}, "'temperature' must be float"),
        ({"type": "extend", "id": 1, "session": "s", "epoch": 0, "start": 0, "rows": 1, "payload": b"", "top_p": 0.0}, "top_p must be in"),
        ({"type": "extend", "id": 1, "session": "s", "epoch": 0, "start": 0, "rows": 1, "payload": b"", "top_logprobs": 21}, "top_logprobs must be <= 20"),
        ({"type": "extend", "id": 1, "session": "s", "epoch": 0, "start": 0, "rows": 2, "payload": b"", "want_token": False, "drafts": [3],
          "temperature": 1.0}, "sampled drafts need q_support >= 1"),
        ({"type": "extend", "id": 1, "session": "s", "epoch": 0, "start": 0, "rows": 2, "payload": b"", "drafts": [3], "q_ids": b"1234"}, "only for sampled drafts"),
        ({"type": "extend", "id": 1, "session": "s", "epoch": 0, "start": 0, "rows": 1, "payload": "text"}, "'payload' must be bytes"),
        ({"type": "extend", "id": 1, "session": "s", "start": 0, "rows": 1, "payload": b""}, "missing fields ['epoch']"),
        ({"type": "result", "id": 1, "session": "s", "epoch": 0, "start": 0, "predicted": [1, "x"], "logprobs": [], "accepted": 0, "token": None, "length": 1}, "'predicted'"),
    ],
)
def test_bad_frames_name_the_bad_part(raw, words) -> None:
    with pytest.raises(p.ProtocolError, match=None) as err:
        p.decode_frame(msgpack.packb(raw))
    assert words in str(err.value) and err.value.code == p.BAD_FRAME


def test_not_msgpack_or_not_a_map_or_too_big() -> None:
    for data in (b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb("hello"), msgpack.packb({1: 2})):
        with pytest.raises(p.ProtocolError):
            p.decode_frame(data)
    with pytest.raises(p.ProtocolError) as err:
        p.decode_frame(p.encode_frame(p.Extend(1, "s", 0, 0, 1, b"x" * 2000, want_token=False)), max_bytes=1000)
    assert err.value.code == p.FRAME_TOO_LARGE
    with pytest.raises(p.ProtocolError):
        p.decode_frame("text")  # type: ignore[arg-type]


def test_encode_validates_too() -> None:
    with pytest.raises(p.ProtocolError):
        p.encode_frame(p.Extend(1, "s", 0, 0, 0, b""))


values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=20) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=10,
)


@settings(max_examples=400, deadline=None)
@given(kind=st.sampled_from(sorted(p.FRAME_TYPES)), fields=st.dictionaries(st.sampled_from(
    ["id", "session", "epoch", "start", "rows", "payload", "codec", "token", "want_token", "drafts", "q_support", "q_ids", "seed",
     "top_p", "temperature", "version", "fingerprint", "exit_layer", "hidden_size", "predicted", "logprobs", "accepted", "length",
     "have", "code", "message", "junk"]), values, max_size=8))
def test_fuzzed_frames_decode_or_fail_as_protocol_error(kind, fields) -> None:
    try:
        frame = p.decode_frame(msgpack.packb({"type": kind, **fields}))
    except p.ProtocolError as exc:
        assert exc.code and str(exc)
    else:
        assert p.decode_frame(p.encode_frame(frame)) == frame


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_never_escape_as_another_exception(data) -> None:
    try:
        p.decode_frame(data)
    except p.ProtocolError:
        pass
