"""Faults between real processes: `offramp cloud serve` behind the link emulator, an edge that is either the real
`offramp edge serve` daemon or the decode loop with its WebSocket link in this process.

Every token is escalated (threshold 2.0, greedy, fp32 states), so the cloud decides every token it can. In every
case the request completes with its full length, tokens decided without the cloud say `edge-fallback`, the cloud
decides again after recovery, and each token it decides is the full model's greedy choice given everything before
it (its context for the session was rebuilt from the edge's copy). Where no fallback token was emitted, the
tokens equal an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from offramp.edge.decode_loop import CLOUD, FALLBACK, CollaborativeDecoder, DecodeOptions
from offramp.models.reference_runtime import TorchEdgeRuntime
from offramp.edge.ws_link import WebSocketCloudLink
from offramp.models.fingerprint import edge_identity
from offramp.models.split import EdgePart
from offramp.bench.link_emulator import LinkEmulator, LinkProfile
from tests.edge.conftest import REQUEST_TIMEOUT, DaemonProcess, http
from tests.reliability.processes import (  # noqa: F401 (fixtures)
    K,
    LAYERS,
    Cloud,
    assert_cloud_tokens_are_the_full_models,
    cloud,
    emulated_link,
    full_model,
    live_cloud,
    tiny_dir,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

PROMPT = [5, 17, 3, 99, 42, 8]
DAEMON_CLOUD_TIMEOUT_S = 0.5  # far above an escalation on lan (a few ms), so a busy machine causes no fallback
SLOW = "profile?name=lan&latency_ms=600"  # a 1.2 s round trip: every escalation outlasts the daemon's timeout
EXIT_BOUND_S = 30.0  # SIGTERM to exit; the drain itself takes well under a second here


# -- helpers ---------------------------------------------------------------------------------------------------


def control(link, action: str) -> None:
    """Drive the emulator process: cut, restore, reset, or profile?name=..."""
    status, body = http("POST", f"{link.control_url}/{action}", b"")
    assert status == 200, body


def start_daemon(model_dir: Path, cloud_url: str, cloud_timeout_s: float) -> DaemonProcess:
    """`offramp edge serve` on the tiny checkpoint, escalating every token to `cloud_url`."""
    extra = ["--model", str(model_dir), "--cloud-timeout", str(cloud_timeout_s), "--no-trained-head"]
    return DaemonProcess(cloud=cloud_url, exit_layer=K, threshold=2.0, codec="fp32", edge_precision="fp32", extra=extra).start()


def complete(daemon: DaemonProcess, max_tokens: int) -> tuple[list[int], list[str]]:
    status, body = http("POST", daemon.base_url + "/v1/completions", {"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0})
    assert status == 200, body
    return body["offramp"]["token_ids"], body["offramp"]["sources"]


def stream(daemon: DaemonProcess, max_tokens: int, on_sources: Callable[[list[str]], None]) -> dict:
    """A streamed completion; `on_sources(all sources so far)` after each chunk. Returns the final chunk's `offramp`
    (token ids, sources, stats) and fails unless the stream ends with [DONE]."""
    body = json.dumps({"prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True}).encode()
    req = urllib.request.Request(daemon.base_url + "/v1/completions", data=body, method="POST", headers={"Content-Type": "application/json"})
    sources: list[str] = []
    final, done = None, False
    with urllib.request.urlopen(req, timeout=REQUEST_TIMEOUT) as resp:
        for raw in resp:
            line = raw.decode().strip()
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            chunk = json.loads(line[len("data: ") :])
            assert "error" not in chunk, chunk
            if chunk["choices"][0]["finish_reason"] is not None:
                final = chunk["offramp"]
            else:
                sources += chunk["offramp"]["sources"]
                on_sources(sources)
    assert done and final is not None, "the stream did not finish"
    assert final["sources"][: len(sources)] == sources
    return final


def runs(sources: list[str]) -> list[tuple[str, int]]:
    """Consecutive runs of one source: [("cloud", 10), ("edge-fallback", 40), ("cloud", 550)]."""
    out: list[tuple[str, int]] = []
    for s in sources:
        if out and out[-1][0] == s:
            out[-1] = (s, out[-1][1] + 1)
        else:
            out.append((s, 1))
    return out


def assert_fell_back_then_resumed(sources: list[str]) -> int:
    """Cloud tokens, then fallback tokens, and cloud tokens again after the last fallback. Returns the index of
    the first token after the fault."""
    assert sources[:10] == [CLOUD] * 10, runs(sources)
    first_fallback = sources.index(FALLBACK)
    last_fallback = len(sources) - 1 - sources[::-1].index(FALLBACK)
    after = sources[last_fallback + 1 :]
    assert len(after) >= 20 and set(after) == {CLOUD}, runs(sources)  # collaboration resumed and stayed up
    return first_fallback


class Fault:
    """Called with the sources so far: injects the fault once `after` tokens are out, recovers once `hold` tokens
    have fallen back (so the fault surely met an escalation)."""

    def __init__(self, inject: Callable[[], None], recover: Callable[[], None], after: int = 10, hold: int = 3) -> None:
        self.inject, self.recover, self.after, self.hold = inject, recover, after, hold
        self.state = "before"

    def __call__(self, sources: list[str]) -> None:
        if self.state == "before" and len(sources) >= self.after:
            self.inject()
            self.state = "during"
        elif self.state == "during" and sources.count(FALLBACK) >= self.hold:
            self.recover()
            self.state = "after"


def edge_link(model, url: str, timeout_s: float = 2.0) -> WebSocketCloudLink:
    """The daemon's link, in this process; short backoff so a test does not wait out 8 s after the fault."""
    return WebSocketCloudLink(url, codec="fp32", manifest=edge_identity(model, K), timeout_s=timeout_s, backoff_s=(0.1, 0.5))


def decoder(model, link: WebSocketCloudLink) -> CollaborativeDecoder:
    return CollaborativeDecoder(TorchEdgeRuntime(EdgePart(model, K)), link, LAYERS)


def escalated_positions(cloud: Cloud) -> float:
    """Positions the cloud ran through its deep layers since it started (its /metrics)."""
    status, text = http("GET", f"http://127.0.0.1:{cloud.port}/metrics")
    assert status == 200
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("offramp_cloud_positions_total"))


# -- the daemon process ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tiny_dir, cloud, emulated_link):  # noqa: F811
    edge = start_daemon(tiny_dir, f"ws://127.0.0.1:{emulated_link.port}", DAEMON_CLOUD_TIMEOUT_S)
    yield edge
    assert edge.stop() == 0, "".join(edge.output[-20:])


@pytest.fixture
def clean_link(emulated_link):  # noqa: F811
    """Each test starts on a healthy lan link, whatever the previous one left."""
    control(emulated_link, "restore")
    control(emulated_link, "profile?name=lan")
    yield emulated_link
    control(emulated_link, "restore")
    control(emulated_link, "profile?name=lan")


@pytest.mark.parametrize("fault", ["cut", "slower-than-timeout"])
def test_daemon_stream_survives_the_link_failing_mid_generation(fault, daemon, live_cloud, clean_link, full_model) -> None:  # noqa: F811
    """A black-holed link (`cut`), or one whose round trip (1.2 s) outlasts --cloud-timeout (0.5 s): the stream goes
    on from the exit head, and the cloud takes over again once the link is back."""
    if fault == "cut":
        injected = Fault(lambda: control(clean_link, "cut"), lambda: control(clean_link, "restore"))
    else:
        injected = Fault(lambda: control(clean_link, SLOW), lambda: control(clean_link, "profile?name=lan"))
    final = stream(daemon, 600, injected)
    tokens, sources = final["token_ids"], final["sources"]
    print(f"{fault}:", runs(sources))
    assert injected.state == "after" and len(tokens) == 600
    first = assert_fell_back_then_resumed(sources)
    assert final["fallback_tokens"] == sources.count(FALLBACK) and final["escalations"] == sources.count(CLOUD)
    assert first >= 10
    assert assert_cloud_tokens_are_the_full_models(full_model, PROMPT, tokens, sources) > 30


def test_daemon_stream_survives_a_connection_reset(daemon, live_cloud, clean_link) -> None:  # noqa: F811
    """Both ends see the connection drop mid-stream (a NAT or proxy giving up) while the cloud is fine: the link
    asks again on a fresh connection, nothing falls back, and the tokens are the uninterrupted run's."""
    reference = complete(daemon, 300)
    assert set(reference[1]) == {CLOUD}
    final = stream(daemon, 300, Fault(lambda: control(clean_link, "reset"), lambda: None, hold=0))
    assert (final["token_ids"], final["sources"]) == reference
    assert http("GET", clean_link.control_url + "/stats")[1]["resets"] >= 1


def test_daemon_cloud_killed_mid_stream_then_restarted_on_the_same_port(daemon, live_cloud, clean_link) -> None:  # noqa: F811
    """SIGKILL the cloud mid-stream: the stream finishes on the edge alone (the cloud is gone for good in it);
    restarted on the same port, the next requests are the cloud's again, token for token as before the kill."""
    reference = complete(daemon, 24)
    assert set(reference[1]) == {CLOUD}
    final = stream(daemon, 300, Fault(live_cloud.kill, lambda: None, hold=0))
    sources = final["sources"]
    assert len(final["token_ids"]) == 300 and sources[:10] == [CLOUD] * 10
    first = sources.index(FALLBACK)
    assert set(sources[first:]) == {FALLBACK}, runs(sources)
    assert http("GET", daemon.base_url + "/healthz")[1]["cloud"]["state"] == "down"

    live_cloud.ensure()  # same port; the daemon's link is backing off (up to 8 s) and then reconnects
    deadline = time.monotonic() + 60
    answer = complete(daemon, 24)
    while set(answer[1]) != {CLOUD} and time.monotonic() < deadline:
        time.sleep(0.5)
        answer = complete(daemon, 24)
    assert answer == reference
    assert http("GET", daemon.base_url + "/healthz")[1]["cloud"]["state"] == "up"


def test_daemon_sigterm_drains_an_in_flight_collaborative_stream(tiny_dir, live_cloud, emulated_link) -> None:  # noqa: F811
    """SIGTERM while a collaborative stream runs: the stream ends complete (its cloud link still serving it),
    then the daemon exits 0, in bounded time."""
    edge = start_daemon(tiny_dir, f"ws://127.0.0.1:{emulated_link.port}", 5.0)
    exit_code: dict[str, int | None] = {}
    stopper = threading.Thread(target=lambda: exit_code.update(rc=edge.stop(timeout=EXIT_BOUND_S)))

    def sigterm_after_five(sources: list[str]) -> None:
        if len(sources) >= 5 and stopper.ident is None:
            stopper.start()

    try:
        final = stream(edge, 300, sigterm_after_five)
        stopper.join(EXIT_BOUND_S + 5)
    finally:
        if edge.proc is not None and edge.proc.poll() is None:
            edge.proc.kill()
    assert len(final["token_ids"]) == 300 and set(final["sources"]) == {CLOUD}
    assert exit_code.get("rc") == 0, "".join(edge.output[-20:])


# -- the decode loop in this process ---------------------------------------------------------------------------


async def test_cloud_killed_mid_generation_and_restarted_rebuilds_the_session(full_model, live_cloud, emulated_link) -> None:  # noqa: F811
    """SIGKILL mid-generation; the edge falls back; the cloud comes back on the same port while the request is
    still going; the session it never saw is rebuilt from the edge (every position re-uploaded) and the cloud's
    tokens are the full model's again."""
    link = edge_link(full_model, f"ws://127.0.0.1:{emulated_link.port}")
    tokens, sources = [], []
    resumed_at = None
    try:
        async for event in decoder(full_model, link).stream(PROMPT, DecodeOptions(max_new_tokens=300, threshold=2.0)):
            tokens.append(event.token_id)
            sources.append(event.source)
            if len(tokens) == 10:
                await asyncio.to_thread(live_cloud.kill)
            if sources.count(FALLBACK) == 5 and not live_cloud.alive():
                await asyncio.to_thread(live_cloud.ensure)  # the generation waits here; nothing escalates meanwhile
                resumed_at = len(tokens)
    finally:
        await link.aclose()
    assert len(tokens) == 300
    first = assert_fell_back_then_resumed(sources)
    assert first == 10
    assert assert_cloud_tokens_are_the_full_models(full_model, PROMPT, tokens, sources) > 30
    assert resumed_at is not None and escalated_positions(live_cloud) >= len(PROMPT) + resumed_at  # all of it went up again
    assert link.reconnects >= 1


async def run_twice_with_fault(full_model, link, options: DecodeOptions, at: int, fault) -> tuple[list[int], list[int], list[str]]:
    """An undisturbed run for reference, then the same run with `await fault()` once `at` tokens are out."""
    reference = [e.token_id async for e in decoder(full_model, link).stream(PROMPT, options)]
    tokens, sources = [], []
    async for event in decoder(full_model, link).stream(PROMPT, options):
        tokens.append(event.token_id)
        sources.append(event.source)
        if len(tokens) == at:
            await fault()
    return reference, tokens, sources


async def test_cloud_restarted_between_escalations_loses_nothing(full_model, live_cloud, emulated_link) -> None:  # noqa: F811
    """The cloud dies and comes back while no escalation is in flight: no fallback token at all, and the tokens
    are those of an uninterrupted run (the new cloud got the whole context from the edge)."""
    link = edge_link(full_model, f"ws://127.0.0.1:{emulated_link.port}", timeout_s=10.0)
    options = DecodeOptions(max_new_tokens=60, threshold=2.0)
    async def restart() -> None:
        await asyncio.to_thread(live_cloud.kill)
        await asyncio.to_thread(live_cloud.ensure)

    try:
        reference, tokens, sources = await run_twice_with_fault(full_model, link, options, 20, restart)
    finally:
        await link.aclose()
    assert sources == [CLOUD] * 60 and tokens == reference
    assert link.reconnects >= 1
    assert escalated_positions(live_cloud) >= len(PROMPT) + 20  # rebuilt from position 0, not just the new token


async def test_cloud_sigterm_mid_generation_exits_cleanly_and_the_edge_falls_back(full_model, live_cloud, emulated_link) -> None:  # noqa: F811
    """SIGTERM the cloud while an edge is generating: the cloud drains and exits 0 in bounded time even though
    the edge keeps its connection open; the generation completes, on the edge alone once the cloud is gone."""
    link = edge_link(full_model, f"ws://127.0.0.1:{emulated_link.port}")
    tokens, sources = [], []
    exited: asyncio.Future | None = None
    try:
        async for event in decoder(full_model, link).stream(PROMPT, DecodeOptions(max_new_tokens=400, threshold=2.0)):
            tokens.append(event.token_id)
            sources.append(event.source)
            if len(tokens) == 10:
                live_cloud.server.proc.send_signal(signal.SIGTERM)
                exited = asyncio.ensure_future(asyncio.to_thread(live_cloud.server.proc.wait, EXIT_BOUND_S))
            if exited is not None and not exited.done():
                await asyncio.sleep(0.005)  # keep the generation alive until the cloud is gone
        assert exited is not None
        rc = await exited
    finally:
        await link.aclose()
        live_cloud.kill()  # only if it hung; the next test starts a fresh one
    assert rc == 0, live_cloud.log()[-2000:]  # proc.wait(EXIT_BOUND_S) raised if the cloud outlived its bound
    assert "offramp cloud: stopped" in live_cloud.log()
    assert len(tokens) == 400 and sources[:10] == [CLOUD] * 10
    first = sources.index(FALLBACK)
    assert set(sources[first:]) == {FALLBACK}, runs(sources)  # nothing half-done after the cloud left


async def test_cloud_sigterm_while_the_link_is_cut_still_exits_in_bounded_time(full_model, live_cloud, clean_link) -> None:  # noqa: F811
    """SIGTERM while the only edge sits behind a black-holed link: the goodbye cannot be delivered, the close
    handshake times out, and the cloud exits 0 anyway; the edge finishes on its own."""
    link = edge_link(full_model, f"ws://127.0.0.1:{clean_link.port}", timeout_s=0.5)
    tokens, sources = [], []
    try:
        async for event in decoder(full_model, link).stream(PROMPT, DecodeOptions(max_new_tokens=200, threshold=2.0)):
            tokens.append(event.token_id)
            sources.append(event.source)
            if len(tokens) == 10:
                await asyncio.to_thread(control, clean_link, "cut")
                started = time.monotonic()
                live_cloud.server.proc.send_signal(signal.SIGTERM)
                rc = await asyncio.to_thread(live_cloud.server.proc.wait, EXIT_BOUND_S)
                took = time.monotonic() - started
    finally:
        await link.aclose()
        live_cloud.kill()  # only if it hung
    assert rc == 0, live_cloud.log()[-2000:]  # proc.wait(EXIT_BOUND_S) raised if the cloud outlived its bound
    assert len(tokens) == 200 and sources[:10] == [CLOUD] * 10 and set(sources[10:]) == {FALLBACK}
    print(f"cloud exited {took:.1f} s after SIGTERM behind a cut link")


async def test_connection_reset_under_an_escalation_costs_no_fallback_token(full_model, live_cloud) -> None:  # noqa: F811
    """The connection drops while an escalation is on the wire (100 ms each way) and the cloud is still there:
    the link asks again on a fresh connection, so no token falls back and the run equals an uninterrupted one."""
    options = DecodeOptions(max_new_tokens=30, threshold=2.0)
    async with LinkEmulator(("127.0.0.1", live_cloud.port), LinkProfile.symmetric("far", 0.1, None)) as emu:
        link = edge_link(full_model, f"ws://127.0.0.1:{emu.port}")
        async def reset_soon() -> None:  # the next escalation leaves at once and is answered 200 ms later
            asyncio.get_running_loop().call_later(0.05, emu.reset)

        try:
            reference, tokens, sources = await run_twice_with_fault(full_model, link, options, 10, reset_soon)
        finally:
            await link.aclose()
    assert emu.stats.resets == 1 and link.reconnects >= 1
    assert sources == [CLOUD] * 30 and tokens == reference
