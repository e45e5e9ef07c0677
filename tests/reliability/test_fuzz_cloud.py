"""Bad input against a live cloud: hypothesis sends mutated frames of every type over a real WebSocket.

One server (tests/cloud/conftest.py's `running_cloud`, a tiny random model) runs on its own loop thread for the
whole module, with two client tokens: ALPHA drives a reference generation over and over, and holds a "victim"
session; BETA is the fuzzer. Every fuzzed input must get exactly one answer: an Error frame whose code is one
of `protocol.ERROR_CODES` (never `internal`), or a valid reply where the input happens to be valid (checked
against what was asked). Meanwhile the reference generation must produce exactly its undisturbed tokens, the
victim session must keep its positions, and memory stays bounded (sessions, KV bytes, per-session locks).

Inputs tried are tallied in the terminal summary (tests/reliability/fuzz_tally.py). Already covered elsewhere, not repeated here:
decode_frame on random bytes and fuzzed fields (tests/shared/test_protocol.py), a handful of fixed bad frames
and the version/fingerprint refusal (tests/cloud/test_server.py). The cloud-only /v1/completions endpoint gets
mutated JSON bodies too: 400 (413 over the body limit) with an OpenAI-style error, never a 5xx. Set
OFFRAMP_FUZZ_EXAMPLES to fuzz longer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import threading
from collections import Counter
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offramp.models.reference_runtime import TorchEdgeRuntime
from offramp.models.split import EdgePart
from offramp.shared import protocol as p
from offramp.shared.codecs import CODECS, get_codec
from tests.cloud.conftest import K, LAYERS, RunningCloud, running_cloud
from tests.cloud.test_server import PROMPTS, alternating, generate
from tests.conftest import make_tiny_llama
from tests.edge.conftest import http, sse_events
from tests.reliability.fuzz_tally import fuzz_tally as tally_for

ALPHA, BETA = "alpha-token-0123456789", "beta-token-9876543210"
H = 64  # the tiny model's hidden size
LIMITS = dict(max_sessions=12, max_sessions_per_client=6, kv_budget_mb=0.25, max_frame_bytes=32 << 10, max_new_tokens=8)
BUDGET_BYTES = int(0.25 * (1 << 20))  # one whole session (256 positions x 512 B) fits; six do not: evictions happen
EXAMPLES = int(os.environ.get("OFFRAMP_FUZZ_EXAMPLES", "800"))
VICTIM = "alpha-victim"
REPLY_TIMEOUT_S = 20.0


class LiveCloud:
    """running_cloud on a loop of its own thread, so sync hypothesis tests can drive it while a reference
    generation runs alongside on the same loop."""

    def __init__(self) -> None:
        self.model = make_tiny_llama(num_layers=LAYERS, seed=11)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzzed-cloud", daemon=True)
        self.thread.start()
        self.stack = contextlib.AsyncExitStack()
        self.cloud: RunningCloud = self.run(self.stack.enter_async_context(running_cloud(self.model, token=[ALPHA, BETA], **LIMITS)))
        self.reference_runs: list[list[int]] = []
        self.reference_errors: list[BaseException] = []
        self._stop_reference: asyncio.Event | None = None
        self._reference_task: asyncio.Future | None = None
        self.clients: list[FrameClient] = []  # closed at the end even when a test failed half-way

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 120.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def runtime(self) -> TorchEdgeRuntime:
        return TorchEdgeRuntime(EdgePart(self.model, K))

    async def reference_once(self) -> list[int]:
        link = self.cloud.link("fp32", token=ALPHA)
        try:
            tokens, _, _ = await generate(self.runtime(), link, PROMPTS[2], 12, 0.5, alternating())
        finally:
            await link.aclose()
        return tokens

    def start_reference(self) -> None:
        """Generate over and over on ALPHA's link (uploads and escalations alternate) until stopped."""

        async def loop_forever() -> None:
            self._stop_reference = asyncio.Event()
            link = self.cloud.link("fp32", token=ALPHA)
            try:
                while not self._stop_reference.is_set():
                    tokens, _, _ = await generate(self.runtime(), link, PROMPTS[2], 12, 0.5, alternating())
                    self.reference_runs.append(tokens)
                    await asyncio.sleep(0.01)
            except BaseException as exc:  # surfaced by the test, not lost in the loop
                self.reference_errors.append(exc)
                raise
            finally:
                await link.aclose()

        self._reference_task = asyncio.run_coroutine_threadsafe(loop_forever(), self.loop)

    def stop_reference(self) -> None:
        if self._stop_reference is not None:
            self.loop.call_soon_threadsafe(self._stop_reference.set)
        if self._reference_task is not None:
            with contextlib.suppress(Exception):
                self._reference_task.result(60)

    def snapshot(self) -> dict[str, int]:
        async def take() -> dict[str, int]:
            state = self.cloud.state
            return {"sessions": len(state.contexts), "kv_bytes": state.contexts.nbytes, "connections": len(state.connections)}

        return self.run(take())

    def close(self) -> None:
        self.stop_reference()
        for client in self.clients:
            self.run(client.close())
        self.run(self.stack.aclose())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)


class FrameClient:
    """A raw WebSocket to the cloud that sends anything and reads the one answer to it."""

    def __init__(self, live: LiveCloud, token: str) -> None:
        self.live, self.token = live, token
        self.http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.pushed_evictions: list[str] = []
        live.clients.append(self)

    async def connect(self) -> None:
        self.http = aiohttp.ClientSession()
        self.ws = await self.http.ws_connect(self.live.cloud.url + p.EDGE_PATH, headers={"Authorization": f"Bearer {self.token}"},
                                             max_msg_size=1 << 24)

    async def hello(self) -> p.Frame:
        m = self.live.cloud.manifest()
        return await self.exchange(p.encode_frame(p.Hello(p.PROTOCOL_VERSION, m["model_fingerprint"], m["exit_layer"], m["hidden_size"], "fuzzer")))

    async def exchange(self, data: bytes | str) -> p.Frame | aiohttp.WSMessage:
        """Send one input; return the first frame that answers it (pushed evictions, id 0, are noted and skipped),
        or the non-binary message if the server closed instead."""
        assert self.ws is not None
        if isinstance(data, str):
            await self.ws.send_str(data)
        else:
            await self.ws.send_bytes(data)
        while True:
            msg = await self.ws.receive(timeout=REPLY_TIMEOUT_S)
            if msg.type != aiohttp.WSMsgType.BINARY:
                return msg
            frame = p.decode_frame(msg.data, 1 << 24)  # the server's own frames must always decode
            if isinstance(frame, p.Evicted) and frame.id == 0:
                self.pushed_evictions.append(frame.session)
                continue
            return frame

    async def leftovers(self, wait_s: float = 0.3) -> list[p.Frame]:
        """Frames that arrived without being asked for (other than pushed evictions): there must be none."""
        assert self.ws is not None
        extra = []
        with contextlib.suppress(asyncio.TimeoutError):
            while True:
                msg = await self.ws.receive(timeout=wait_s)
                if msg.type != aiohttp.WSMsgType.BINARY:
                    break
                frame = p.decode_frame(msg.data, 1 << 24)
                if not (isinstance(frame, p.Evicted) and frame.id == 0):
                    extra.append(frame)
        return extra

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self.http is not None:
            await self.http.close()
        self.ws = self.http = None


@pytest.fixture(scope="module")
def fuzz_tally(pytestconfig: pytest.Config) -> Counter[str]:
    return tally_for(pytestconfig)


@pytest.fixture(scope="module")
def live():
    live = LiveCloud()
    try:
        yield live
    finally:
        live.close()


# -- what the fuzzer knows about its own sessions -----------------------------------------------------------


@dataclass
class OwnSession:
    codec: str
    length: int = 0  # positions the cloud held at our last answer (an eviction only lowers it)
    open: bool = True
    epoch: int = 0  # the session's epoch at our last answer


@dataclass
class FuzzState:
    own: dict[str, OwnSession] = field(default_factory=dict)
    next_id: int = 1
    tried: Counter[str] = field(default_factory=Counter)

    def rid(self) -> int:
        self.next_id += 1
        return self.next_id

    @property
    def open_count(self) -> int:
        return sum(1 for s in self.own.values() if s.open)


@dataclass
class Expect:
    """What an input may get: error codes, or reply types (then `check_reply` validates the reply against the request)."""

    errors: frozenset[str] = frozenset()
    replies: tuple[type, ...] = ()

    @classmethod
    def error(cls, *codes: str) -> "Expect":
        return cls(frozenset(codes))


# -- strategies ---------------------------------------------------------------------------------------------------

packable_int = st.integers(-(2**63), 2**64 - 1)  # what msgpack can carry
session_text = st.text(st.characters(codec="utf-8"), min_size=1, max_size=24)
WRONG_INT = st.one_of(st.text(max_size=4), st.floats(allow_nan=True), st.booleans(), st.none(), st.binary(max_size=4),
                      st.lists(st.integers(0, 3), max_size=2), st.integers(-(2**63), -1), st.integers(p.MAX_ID + 1, 2**64 - 1))
WRONG_STR = st.one_of(packable_int, st.binary(max_size=4), st.none(), st.booleans(), st.floats(), st.lists(st.text(max_size=2), max_size=2))
WRONG_BYTES = st.one_of(st.text(max_size=4), packable_int, st.none(), st.lists(st.integers(0, 255), max_size=3), st.floats())
WRONG_FLOAT = st.one_of(st.sampled_from([math.nan, math.inf, -math.inf]), st.text(max_size=3), st.none(), st.booleans(), st.binary(max_size=2))
WRONG_BOOL = st.one_of(st.integers(), st.text(max_size=3), st.none(), st.floats(allow_nan=False), st.just([]))
WRONG_LIST = st.one_of(st.integers(), st.text(max_size=3), st.just({}), st.lists(st.text(max_size=2), min_size=1, max_size=2),
                       st.lists(st.integers(-(2**63), -1), min_size=1, max_size=2))
OUT_OF_RANGE = {"temperature": st.floats(max_value=-1e-9, allow_nan=False, allow_infinity=False),
                "top_p": st.one_of(st.just(0.0), st.floats(min_value=1.0 + 1e-9, allow_nan=False, allow_infinity=False)),
                "top_logprobs": st.integers(p.MAX_TOP_K + 1, 10**6),
                "q_support": st.integers(p.MAX_DRAFT_SUPPORT + 1, 10**6),
                "drafts": st.lists(st.integers(0, 127), min_size=2, max_size=4),  # more drafts than the one row holds
                "rows": st.just(0)}  # an escalation (want_token) needs a row
FIELD_KINDS = {"id": int, "epoch": int, "start": int, "rows": int, "seed": int, "top_logprobs": int, "q_support": int,
               "session": str, "codec": str, "payload": bytes, "q_ids": bytes, "q_probs": bytes,
               "temperature": float, "top_p": float, "want_token": bool, "rebase": bool, "base_epoch": int, "drafts": list}
OPTIONAL = ("want_token", "drafts", "q_support", "q_ids", "q_probs", "temperature", "top_p", "seed", "top_logprobs", "rebase", "base_epoch")
EDGE_FRAMES = {"open": ["id", "session", "codec"], "close": ["id", "session"],
               "extend": ["id", "session", "epoch", "start", "rows", "payload", *OPTIONAL]}
CLOUD_ONLY = [p.Welcome(p.PROTOCOL_VERSION, "x", 2, 256, ["fp32"], 1024), p.Opened(1, "s", 0), p.Closed(1, "s"),
              p.Result(1, "s", 0, 0, [1], [-0.5], 0, 1, 1), p.Stale(1, "s", 1, 0),
              p.Evicted(1, "s", 0, 0, "x"), p.Error(1, p.BAD_FRAME, "x"), p.Hello(p.PROTOCOL_VERSION, "f" * 64, K, H)]


def cut(data: st.DataObject, length: int) -> int:
    """Where to truncate `length` bytes (0..length-1), drawn as a fraction: draws must not depend on state."""
    return min(length - 1, int(data.draw(st.floats(0, 1), label="cut") * length))


def valid_payload(data: st.DataObject, codec: str, rows: int) -> bytes:
    seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
    scale = data.draw(st.sampled_from([0.0, 1.0, 30.0]), label="scale")
    hidden = np.random.default_rng(seed).standard_normal((rows, H)).astype(np.float32) * scale
    return get_codec(codec).encode(hidden)


POISONS = ("nan", "overflow", "outlier")


def poisoned_payload(data: st.DataObject, codec: str, rows: int, how: str) -> bytes:
    """A payload of the right size whose decoded states are not all finite: a NaN/inf value (fp32, fp16) or
    per-row scale (int8, int8o); a finite scale near float32's max times 127 ("overflow", int8/int8o); an
    inf outlier value (int8o)."""
    buf = bytearray(valid_payload(data, codec, rows))
    bad = data.draw(st.sampled_from([math.nan, math.inf, -math.inf]), label="non-finite")
    cell = data.draw(st.integers(0, rows * H - 1), label="cell")
    row = data.draw(st.integers(0, rows - 1), label="row")
    k = CODECS["int8o"].k
    outlier = data.draw(st.integers(0, rows * k - 1), label="outlier")
    if codec in ("fp32", "fp16"):
        dtype = np.dtype("<f4" if codec == "fp32" else "<f2")
        buf[cell * dtype.itemsize:(cell + 1) * dtype.itemsize] = np.array([bad], dtype).tobytes()
    elif how == "outlier" and codec == "int8o":
        at = 4 * rows + rows * H + 2 * rows * k + 2 * outlier
        buf[at:at + 2] = np.array([bad], "<f2").tobytes()
    elif how == "overflow":  # every int8 channel of the row at 127 (outliers replace only k of them)
        buf[4 * row:4 * row + 4] = np.array([3e38], "<f4").tobytes()
        q = 4 * rows + row * H
        buf[q:q + H] = np.full(H, 127, np.int8).tobytes()
    else:
        buf[4 * row:4 * row + 4] = np.array([bad], "<f4").tobytes()
    return bytes(buf)


def draw_payload(data: st.DataObject, codec: str, rows: int) -> tuple[str, bytes]:
    kind = data.draw(st.sampled_from(["valid", "valid", *POISONS, "truncated", "extended", "other_codec", "huge", "empty"]), label="payload")
    if rows == 0:  # nothing to poison: an empty upload is valid (it rolls the session back to `start`)
        return "valid", b""
    if kind == "empty":
        return kind, b""
    if kind in POISONS:
        return kind, poisoned_payload(data, codec, rows, kind)
    good = valid_payload(data, codec, rows)
    if kind == "truncated":
        return kind, good[: cut(data, len(good))]
    if kind == "extended":
        return kind, good + data.draw(st.binary(min_size=1, max_size=64), label="extra")
    if kind == "other_codec":
        other = data.draw(st.sampled_from(sorted(set(CODECS) - {codec})), label="other")
        other_rows = data.draw(st.integers(1, 8), label="other rows")
        return kind, valid_payload(data, other, other_rows)
    if kind == "huge" and codec == "fp32":
        return kind, np.full((rows, H), data.draw(st.sampled_from([1e30, -3e38, 1e10]), label="huge"), np.float32).tobytes()
    return "valid", good


# -- one fuzzed input: build it, say what it may get ------------------------------------------------------------


def build_input(data: st.DataObject, fz: FuzzState, max_positions: int, max_frame: int) -> tuple[str, bytes | str, Expect, dict]:
    """(class, bytes to send, expectation, request fields for checking a success reply)."""
    cls = data.draw(st.sampled_from(["session_op"] * 6 + ["wrong_type", "out_of_range", "missing_field", "unknown_field",
                                                          "unknown_type", "cloud_only", "truncated", "garbage", "oversized", "text"]), label="class")
    if cls == "session_op":
        return session_op(data, fz, max_positions)
    if cls == "text":
        return cls, data.draw(st.text(max_size=40), label="text"), Expect.error(p.BAD_FRAME), {}
    if cls == "garbage":
        raw = data.draw(st.binary(max_size=200), label="garbage")
        return cls, raw, Expect.error(p.BAD_FRAME), {}
    if cls == "cloud_only":
        return cls, p.encode_frame(data.draw(st.sampled_from(CLOUD_ONLY), label="frame")), Expect.error(p.BAD_FRAME), {}
    if cls == "oversized":  # over --max-frame-bytes but within what the WebSocket layer buffers: an error frame
        size = data.draw(st.integers(max_frame + 1, max_frame + (32 << 10)), label="size")
        frame = {"type": "extend", "id": fz.rid(), "session": "big", "epoch": 0, "start": 0, "rows": 1, "payload": b"\0" * size}
        return cls, msgpack.packb(frame, use_bin_type=True), Expect.error(p.FRAME_TOO_LARGE), {}
    kind = data.draw(st.sampled_from(sorted(EDGE_FRAMES)), label="frame type")
    frame = base_frame(data, fz, kind)
    if cls == "truncated":
        good = msgpack.packb(frame, use_bin_type=True)
        return cls, good[: cut(data, len(good))], Expect.error(p.BAD_FRAME), {}
    if cls == "wrong_type":
        name = data.draw(st.sampled_from(EDGE_FRAMES[kind]), label="field")
        wrong = {int: WRONG_INT, str: WRONG_STR, bytes: WRONG_BYTES, float: WRONG_FLOAT, bool: WRONG_BOOL, list: WRONG_LIST}[FIELD_KINDS[name]]
        if name == "session":
            wrong = st.one_of(wrong, st.just(""), st.text(min_size=p.MAX_SESSION_ID + 1, max_size=p.MAX_SESSION_ID + 8))
        frame[name] = data.draw(wrong, label="wrong value")
    elif cls == "out_of_range":
        if kind != "extend":
            return cls, msgpack.packb(frame | {"id": -data.draw(st.integers(1, 2**63), label="neg")}), Expect.error(p.BAD_FRAME), {}
        name = data.draw(st.sampled_from(sorted(OUT_OF_RANGE)), label="field")
        frame[name] = data.draw(OUT_OF_RANGE[name], label="value")
    elif cls == "missing_field":
        del frame[data.draw(st.sampled_from([f for f in EDGE_FRAMES[kind] if f not in OPTIONAL]), label="drop")]
    elif cls == "unknown_field":
        frame[data.draw(st.sampled_from(["junk", "token", "have", "version", "x"]), label="extra")] = 1
    elif cls == "unknown_type":
        frame["type"] = data.draw(st.one_of(st.text(max_size=8).filter(lambda t: t not in p.FRAME_TYPES), packable_int, st.none()), label="type")
    return cls, msgpack.packb(frame, use_bin_type=True), Expect.error(p.BAD_FRAME), {}


def pick_own(fz: FuzzState, index: int) -> str:
    """One of our sessions by a drawn index: what hypothesis draws must not depend on state it cannot see."""
    names = sorted(fz.own)
    return names[index % len(names)]


def base_frame(data: st.DataObject, fz: FuzzState, kind: str) -> dict:
    """A well-formed frame of `kind` (to mutate) for one of our sessions or a made-up one."""
    pick = data.draw(st.integers(0, 63) | session_text, label="session")
    session = pick_own(fz, pick) if isinstance(pick, int) else pick
    frame: dict[str, Any] = {"type": kind, "id": fz.rid(), "session": session}
    if kind == "open":
        frame["codec"] = "fp32"
    if kind == "extend":
        frame |= {"epoch": 0, "start": 0, "rows": 1, "payload": b"\0" * (4 * H), "want_token": True, "drafts": [], "q_support": 0,
                  "q_ids": b"", "q_probs": b"", "temperature": 0.0, "top_p": 1.0, "seed": 0, "top_logprobs": 0, "rebase": False}
    return frame


def session_op(data: st.DataObject, fz: FuzzState, max_positions: int) -> tuple[str, bytes, Expect, dict]:
    """A well-formed open/close/upload/escalate/verify for our own, a closed, an unknown or ALPHA's session."""
    op = data.draw(st.sampled_from(["open", "close", "upload", "upload", "escalate", "escalate", "verify", "verify"]), label="op")
    target = data.draw(st.sampled_from(["own", "own", "own", "own", "unknown", "foreign"]), label="target")
    index = data.draw(st.integers(0, 63), label="own session")
    new_name = "fz-" + data.draw(session_text, label="new session")[:100]
    session = {"own": pick_own(fz, index), "foreign": VICTIM, "unknown": new_name}[target]
    own = fz.own.get(session) if target != "foreign" else None
    rid = fz.rid()
    req: dict[str, Any] = {"op": op, "id": rid, "session": session}
    if op == "open":
        codec = data.draw(st.sampled_from(sorted(CODECS) + ["zip", "", "FP32"]), label="codec")
        frame = p.Open(rid, session, codec)
        if codec not in CODECS:
            expect = Expect.error(p.BAD_CODEC)
        elif target == "foreign":
            expect = Expect.error(p.FORBIDDEN)
        elif own is not None and own.open:
            expect = Expect(replies=(p.Opened,))
        elif fz.open_count >= LIMITS["max_sessions_per_client"]:
            expect = Expect.error(p.TOO_MANY_SESSIONS)
        else:
            expect = Expect(replies=(p.Opened,))
        req["codec"] = codec
        return f"open_{target}", p.encode_frame(frame), expect, req
    if op == "close":
        expect = Expect.error(p.FORBIDDEN) if target == "foreign" else Expect(replies=(p.Closed,))
        return f"close_{target}", p.encode_frame(p.Close(rid, session)), expect, req
    any_codec = data.draw(st.sampled_from(sorted(CODECS)), label="codec")
    codec = own.codec if own is not None and own.open else any_codec
    rows = data.draw(st.sampled_from([0, 1, 1, 2, 3, 8]) if op == "upload" else st.sampled_from([1, 1, 2, 3, 8]), label="rows")
    kind, payload = draw_payload(data, codec, rows)
    known = own.length if own is not None and own.open else 0
    epoch = own.epoch if own is not None and own.open else 0
    where = data.draw(st.sampled_from(["next", "next", "rollback", "gap", "edge", "beyond", "huge"]), label="start")
    back, gap = data.draw(st.floats(0, 1), label="back"), data.draw(st.integers(1, 10), label="gap")
    edge, past, huge = data.draw(st.integers(0, 1), label="edge"), data.draw(st.integers(0, 100), label="past"), data.draw(st.integers(2**40, p.MAX_ID), label="huge")
    start = {"next": known, "rollback": int(known * back), "gap": known + gap, "edge": max(0, max_positions - rows + edge),
             "beyond": max_positions + past, "huge": huge}[where]
    when = data.draw(st.sampled_from(["now", "now", "now", "stale", "newer", "rebase"]), label="epoch")
    sent_epoch = {"now": epoch, "stale": epoch - 1, "newer": epoch + 1 + gap, "rebase": epoch + gap}[when]
    if sent_epoch < 0:
        when, sent_epoch = "now", epoch
    temperature = data.draw(st.sampled_from([0.0, 0.0, 0.7, 1e-300, 1e300]), label="temperature")
    top_p = data.draw(st.sampled_from([1.0, 0.9, 1e-9]), label="top_p")
    seed = data.draw(st.integers(0, p.MAX_ID), label="seed")
    want_token, drafts, q = op == "escalate", [], {}
    if op == "verify":
        want_token = data.draw(st.booleans(), label="pick") and rows > 1
        drafts = data.draw(st.lists(st.integers(0, 127), min_size=1, max_size=rows - int(want_token)), label="drafts")
        if temperature > 0:  # sampled drafts carry the edge's q: the draft and one other token
            ids = np.array([[d, (d + 1) % 128] for d in drafts], dtype="<i4")
            probs = np.tile(np.array([0.75, 0.25], dtype="<f4"), (len(drafts), 1))
            q = {"q_support": 2, "q_ids": ids.tobytes(), "q_probs": probs.tobytes()}
    frame = p.Extend(rid, session, sent_epoch, start, rows, payload, want_token, drafts, temperature=temperature, top_p=top_p,
                     seed=seed, top_logprobs=data.draw(st.sampled_from([0, 0, 3]), label="top"), rebase=when == "rebase",
                     base_epoch=epoch if when == "rebase" else 0, **q)
    req |= {"start": start, "rows": rows, "codec": codec, "epoch": sent_epoch, "when": when, "want_token": want_token, "drafts": drafts}
    label = f"{op}_{target}_{codec}_{kind}_{where}_{when}"
    if target == "foreign":
        return label, p.encode_frame(frame), Expect.error(p.FORBIDDEN), req
    if own is None or not own.open:  # never opened (or closed): the cloud says it holds nothing
        return label, p.encode_frame(frame), Expect(replies=(p.Evicted,)), req
    # what the payload is, by construction (not by asking the codec under test): the right size for
    # [rows, H] in the session's codec, and finite
    right_size = len(payload) == get_codec(codec).nbytes(rows, H)
    if kind in (*POISONS, "truncated", "extended") or not right_size:
        return label, p.encode_frame(frame), Expect.error(p.BAD_HIDDEN), req
    # another codec's bytes of the same size decode to anything (NaN/inf in fp16 too); huge finite states may
    # overflow in the deep layers: either may be refused as bad_hidden, but never answered with NaN (check_reply
    # looks at that). The cloud checks the states before the positions, so past the context it may say either.
    # A stale epoch is answered Stale, a newer one without a rebase Evicted (the copy may predate a rollback),
    # and any request may find its session evicted by the KV budget.
    maybe_bad = kind in ("other_codec", "huge")
    if start + rows > max_positions:
        codes = (p.BAD_POSITIONS, p.BAD_HIDDEN) if maybe_bad else (p.BAD_POSITIONS,)
        return label, p.encode_frame(frame), Expect.error(*codes), req
    replies = {"stale": (p.Stale, p.Evicted), "newer": (p.Evicted,)}.get(when, (p.Result, p.Evicted))
    return label, p.encode_frame(frame), Expect(frozenset({p.BAD_HIDDEN}) if maybe_bad and when not in ("stale", "newer") else frozenset(), replies), req


def check_reply(reply: Any, expect: Expect, req: dict, fz: FuzzState, vocab: int) -> None:
    """The answer is one the input allows; success replies match the request; our session book-keeping follows."""
    assert not isinstance(reply, aiohttp.WSMessage), f"the server closed instead of answering: {reply}"
    if isinstance(reply, p.Error):
        assert reply.code in p.ERROR_CODES and reply.code != p.INTERNAL and reply.message, reply
        assert reply.code in expect.errors, f"expected {sorted(expect.errors) or 'a reply'} {expect.replies}, got {reply}"
        return
    assert isinstance(reply, expect.replies), f"expected {expect.replies or sorted(expect.errors)}, got {reply}"
    assert reply.id == req["id"] and reply.session == req["session"], (reply, req)
    own = fz.own.get(req["session"])
    if isinstance(reply, p.Opened):
        if own is None or not own.open:
            fz.own[req["session"]] = OwnSession(req["codec"], reply.length, epoch=reply.epoch)
        else:  # re-opened: same positions, and the codec named now
            own.codec, own.length, own.epoch = req["codec"], reply.length, reply.epoch
    elif isinstance(reply, p.Closed):
        if own is not None:
            own.open, own.length = False, 0
    elif isinstance(reply, p.Evicted):
        if reply.epoch == req.get("epoch", 0):
            assert reply.have < max(req["start"], 1), (reply, req)  # re-upload from where the cloud stands
        else:  # held at another epoch: the edge decides which prefix still holds
            assert req.get("when") in ("newer", "now", "rebase", None) or reply.have == 0, (reply, req)
        if own is not None and own.open:
            own.length, own.epoch = reply.have, reply.epoch
    elif isinstance(reply, p.Stale):
        assert req["when"] == "stale" and reply.epoch == own.epoch and reply.length == own.length, (reply, req)
    else:
        assert isinstance(reply, p.Result)
        rows, start, drafts = req["rows"], req["start"], req["drafts"]
        assert reply.start == start and 0 <= reply.accepted <= len(drafts), (reply, req)
        assert len(reply.predicted) == len(reply.logprobs) == rows
        assert all(0 <= t < vocab for t in reply.predicted) and all(math.isfinite(x) and x <= 0 for x in reply.logprobs)
        rejected = reply.accepted < len(drafts)
        first = rows - len(drafts) - int(req["want_token"])
        if rejected:  # the rows after the first rejected draft are dropped, and the epoch moves on
            assert reply.length == start + first + reply.accepted + 1 and reply.epoch == req["epoch"] + 1, (reply, req)
        else:
            assert reply.length == start + rows and reply.epoch == req["epoch"], (reply, req)
        if rejected or req["want_token"]:
            assert reply.token is not None and 0 <= reply.token < vocab
        else:
            assert reply.token is None
        assert len(reply.token_logprobs) == reply.accepted + (reply.token is not None)
        own.length, own.epoch = reply.length, reply.epoch


# -- the tests ------------------------------------------------------------------------------------------------------


def bounded(live: LiveCloud, snap: dict[str, int]) -> None:
    assert snap["sessions"] <= LIMITS["max_sessions"], snap
    assert snap["kv_bytes"] <= BUDGET_BYTES, snap


def test_fuzzed_frames_get_coded_errors_and_leave_other_sessions_alone(live, fuzz_tally) -> None:
    cloud = live.cloud
    max_positions, vocab = cloud.state.max_positions, cloud.state.vocab_size
    expected = live.run(live.reference_once())  # the undisturbed run
    victim = FrameClient(live, ALPHA)  # ALPHA's session the fuzzer will try to touch; its connection goes away
    live.run(victim.connect())
    assert isinstance(live.run(victim.hello()), p.Welcome)
    assert isinstance(live.run(victim.exchange(p.encode_frame(p.Open(1, VICTIM, "fp16")))), p.Opened)
    victim_rows = CODECS["fp16"].encode(np.random.default_rng(0).standard_normal((5, H)).astype(np.float32))
    held = live.run(victim.exchange(p.encode_frame(p.Extend(2, VICTIM, 0, 0, 5, victim_rows, want_token=False))))
    assert isinstance(held, p.Result) and held.length == 5
    live.run(victim.close())
    alpha = cloud.state.contexts.peek(VICTIM).owner
    fuzzer = FrameClient(live, BETA)
    live.run(fuzzer.connect())
    assert isinstance(live.run(fuzzer.hello()), p.Welcome)
    fz = FuzzState()
    for i, codec in enumerate(sorted(CODECS)):  # our own sessions, one per codec
        sid = f"beta-{codec}"
        assert isinstance(live.run(fuzzer.exchange(p.encode_frame(p.Open(100 + i, sid, codec)))), p.Opened)
        fz.own[sid] = OwnSession(codec)
    live.start_reference()

    @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def one_input(data: st.DataObject) -> None:
        cls, raw, expect, req = build_input(data, fz, max_positions, LIMITS["max_frame_bytes"])
        fuzz_tally["cloud frames"] += 1
        fz.tried[cls] += 1
        reply = live.run(fuzzer.exchange(raw))
        if fuzzer.pushed_evictions:  # the KV budget evicted some of ours: the cloud now holds nothing of them
            for sid in fuzzer.pushed_evictions:
                if sid in fz.own:
                    fz.own[sid].length = 0
            fuzzer.pushed_evictions.clear()
        check_reply(reply, expect, req, fz, vocab)
        bounded(live, live.snapshot())

    try:
        one_input()
        assert live.run(fuzzer.leftovers()) == []  # one answer per input, nothing unasked
        ran_alongside = len(live.reference_runs)
    finally:
        live.stop_reference()
    assert not live.reference_errors, live.reference_errors
    assert ran_alongside >= 1 and all(run == expected for run in live.reference_runs), (expected, live.reference_runs[:3])
    # the victim is intact: still ALPHA's, and (unless the KV budget evicted it, which is no harm) 5 positions long
    contexts = cloud.state.contexts
    assert VICTIM not in contexts or (contexts.peek(VICTIM).owner == alpha and contexts.peek(VICTIM).length == 5)
    live.run(fuzzer.close())
    live.run(asyncio.sleep(0.2))
    snap = live.snapshot()
    bounded(live, snap)
    assert snap["connections"] == 0, snap  # nothing held for requests that are answered
    # the server still serves a fresh edge the same tokens
    assert live.run(live.reference_once()) == expected
    print(f"cloud fuzz: {sum(fz.tried.values())} inputs by class {dict(sorted(fz.tried.items()))}")


HELLO_FIELDS = {"version": int, "fingerprint": str, "exit_layer": int, "hidden_size": int, "client": str}


def test_fuzzed_hellos_are_refused_with_a_code_or_welcomed(live, fuzz_tally) -> None:
    m = live.cloud.manifest()
    good = {"type": "hello", "version": p.PROTOCOL_VERSION, "fingerprint": m["model_fingerprint"], "exit_layer": m["exit_layer"],
            "hidden_size": m["hidden_size"], "client": "fuzz"}

    @settings(max_examples=max(50, EXAMPLES // 4), deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def one_hello(data: st.DataObject) -> None:
        hello = dict(good)
        what = data.draw(st.sampled_from(["valid", "version", "fingerprint", "exit_layer", "hidden_size", "wrong_type", "not_hello",
                                          "truncated", "text"]), label="mutation")
        expect = {"valid": "welcome", "version": p.VERSION_MISMATCH, "fingerprint": p.MODEL_MISMATCH, "exit_layer": p.MODEL_MISMATCH,
                  "hidden_size": p.MODEL_MISMATCH, "wrong_type": p.BAD_FRAME, "not_hello": p.NOT_HELLO, "truncated": p.BAD_FRAME,
                  "text": p.NOT_HELLO}[what]
        if what == "version":
            hello["version"] = data.draw(st.integers(0, p.MAX_ID).filter(lambda v: v != p.PROTOCOL_VERSION), label="version")
        elif what == "fingerprint":
            hello["fingerprint"] = data.draw(st.text(max_size=70).filter(lambda f: f != good["fingerprint"]), label="fingerprint")
        elif what in ("exit_layer", "hidden_size"):
            hello[what] = data.draw(st.integers(0, 10**6).filter(lambda v: v != good[what]), label=what)
        elif what == "wrong_type":
            name = data.draw(st.sampled_from(sorted(HELLO_FIELDS)), label="field")
            hello[name] = data.draw(WRONG_INT if HELLO_FIELDS[name] is int else WRONG_STR, label="value")
        raw: bytes | str = msgpack.packb(hello, use_bin_type=True)
        if what == "not_hello":
            raw = p.encode_frame(p.Open(1, "s", "fp32"))
        elif what == "truncated":
            raw = raw[: cut(data, len(raw))]
        elif what == "text":
            raw = data.draw(st.text(max_size=30), label="text")
        fuzz_tally["cloud hellos"] += 1
        client = FrameClient(live, BETA)
        live.run(client.connect())
        try:
            reply = live.run(client.exchange(raw))
            if expect == "welcome":
                assert isinstance(reply, p.Welcome), reply
            else:
                assert isinstance(reply, p.Error) and reply.code == expect and reply.message, (what, reply)
                closing = live.run(client.ws.receive(timeout=REPLY_TIMEOUT_S))  # and the server hangs up
                assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.CLOSING), closing
        finally:
            live.run(client.close())

    connections = live.snapshot()["connections"]
    one_hello()
    live.run(asyncio.sleep(0.2))
    assert live.snapshot()["connections"] == connections  # every refused edge was hung up on
    assert live.run(live.reference_once()) == live.run(live.reference_once())  # still serving, and the same


# -- the cloud-only completions endpoint ------------------------------------------------------------------------

COMPLETION_WRONG = {
    "prompt": st.one_of(st.integers(), st.just([]), st.just(""), st.none(), st.just({}), st.text(min_size=1, max_size=5),
                        st.lists(st.booleans() | st.floats(allow_nan=False) | st.text(max_size=2), min_size=1, max_size=3),
                        st.lists(st.integers(128, 2**62) | st.integers(-(2**62), -1), min_size=1, max_size=3)),
    "max_tokens": st.one_of(st.integers(max_value=0), st.integers(9, 2**70), st.booleans(), st.floats(allow_nan=False), st.text(max_size=3), st.none()),
    "temperature": st.one_of(st.floats(max_value=-1e-6, allow_nan=False), st.text(max_size=3), st.booleans(), st.none(), st.just([]), st.integers(10**310, 10**320)),
    "top_p": st.one_of(st.just(0), st.floats(min_value=1.001, allow_nan=False), st.text(max_size=3), st.booleans(), st.none(), st.integers(10**310, 10**320)),
    "seed": st.one_of(st.integers(max_value=-1), st.integers(2**63, 2**70), st.floats(allow_nan=False), st.text(max_size=3), st.booleans()),
    "stream": st.one_of(st.integers(), st.text(max_size=3), st.none(), st.just([])),
}


def completion_case(data: st.DataObject) -> tuple[str, bytes, int]:
    """(kind, body, expected status)."""
    body = {"prompt": data.draw(st.lists(st.integers(0, 127), min_size=1, max_size=12), label="prompt"),
            "max_tokens": data.draw(st.integers(1, 8), label="max_tokens")}
    for name, value in (("temperature", st.floats(0, 2)), ("top_p", st.floats(0.01, 1)), ("seed", st.integers(0, 2**63 - 1)), ("stream", st.booleans())):
        if data.draw(st.booleans(), label=f"has {name}"):
            body[name] = data.draw(value, label=name)
    kind = data.draw(st.sampled_from(["valid", "wrong_field", "wrong_field", "malformed", "invalid_utf8", "not_an_object", "nested", "non_finite", "too_large"]), label="kind")
    raw = json.dumps(body).encode()
    if kind == "valid":
        return kind, raw, 200
    if kind == "wrong_field":
        name = data.draw(st.sampled_from(sorted(COMPLETION_WRONG)), label="field")
        body[name] = data.draw(COMPLETION_WRONG[name], label="value")
        return f"wrong_{name}", json.dumps(body).encode(), 400
    if kind == "malformed":
        return kind, raw[: cut(data, len(raw))], 400
    if kind == "invalid_utf8":
        at = data.draw(st.integers(0, len(raw)), label="at")
        return kind, raw[:at] + data.draw(st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x80"]), label="bytes") + raw[at:], 400
    if kind == "not_an_object":
        return kind, json.dumps(data.draw(st.lists(st.integers(), max_size=3) | st.text(max_size=4) | st.none(), label="value")).encode(), 400
    if kind == "nested":
        depth = data.draw(st.integers(2000, 100_000), label="depth")
        return kind, b'{"prompt": ' + b"[" * depth + b"]" * depth + b"}", 400
    if kind == "non_finite":
        name = data.draw(st.sampled_from(["temperature", "top_p", "max_tokens", "seed"]), label="field")
        return kind, raw[:-1] + f', "{name}": {data.draw(st.sampled_from(["NaN", "Infinity", "-Infinity"]), label="constant")}}}'.encode(), 400
    return kind, b'{"prompt": [1], "pad": "' + b"x" * ((1 << 20) + data.draw(st.integers(1, 1000), label="extra")) + b'"}', 413


def test_fuzzed_completion_bodies_are_refused_with_openai_errors_or_served(live, fuzz_tally) -> None:
    url = live.cloud.http_url + "/v1/completions"
    auth = {"Authorization": f"Bearer {BETA}", "Content-Type": "application/json"}
    tried: Counter[str] = Counter()

    @settings(max_examples=max(50, EXAMPLES // 4), deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def one_body(data: st.DataObject) -> None:
        kind, raw, expected = completion_case(data)
        fuzz_tally["cloud completion bodies"] += 1
        tried[kind] += 1
        status, answer = http("POST", url, raw, auth)
        assert status == expected, (kind, status, answer, raw[:200])
        if status == 200:
            body = json.loads(raw)
            if body.get("stream"):
                events = sse_events(answer)
                assert events[-1] == "[DONE]" and sum(len(e["choices"][0]["token_ids"]) for e in events[:-1]) <= body["max_tokens"]
            else:
                assert 1 <= len(answer["choices"][0]["token_ids"]) <= body["max_tokens"]
        else:
            assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}, answer
            assert answer["error"]["message"] and answer["error"]["type"] == "invalid_request_error", answer

    one_body()
    assert live.snapshot()["connections"] == 0 and live.cloud.state.completions_inflight == 0
    assert {"valid", "malformed", "invalid_utf8"} <= set(tried), tried
