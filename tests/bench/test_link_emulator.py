"""The link emulator really delays, throttles, keeps order, cuts and resets (against an echo server on loopback).

Timing bounds are generous on the slow side: this machine is shared, so a late delivery is possible, an early
one is not (the proxy never delivers before its schedule).
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import pytest

from offramp.bench.link_emulator import PROFILES, Direction, LinkEmulator, LinkProfile

MBIT = 1e6
pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.timeout(60)]


@pytest.fixture
async def echo_server():
    """An echo server on a random loopback port; yields its port."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def _ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, payload: bytes = b"x" * 32) -> float:
    start = time.perf_counter()
    writer.write(payload)
    await writer.drain()
    await asyncio.wait_for(reader.readexactly(len(payload)), 5.0)
    return time.perf_counter() - start


async def test_round_trip_is_twice_the_one_way_latency(echo_server: int) -> None:
    profile = LinkProfile.symmetric("test", 0.020, None)
    async with LinkEmulator(("127.0.0.1", echo_server), profile) as link:
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        first = await _ping(reader, writer)  # pays the emulated TCP handshake too
        rtts = [await _ping(reader, writer) for _ in range(8)]
        writer.close()
    # Lower bounds only: the emulator holds every byte at least its latency; how much longer a loaded machine
    # takes is not the emulator's doing (no upper wall-clock bounds in unit tests).
    assert first >= 0.080, first
    assert all(r >= 0.039 for r in rtts), rtts
    assert link.stats.bytes_up == link.stats.bytes_down == 9 * 32


async def test_without_shaping_the_proxy_adds_little(echo_server: int) -> None:
    async with LinkEmulator(("127.0.0.1", echo_server), PROFILES["none"]) as link:
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        rtts = [await _ping(reader, writer) for _ in range(8)]
        writer.close()
    assert len(rtts) == 8 and link.stats.bytes_up == link.stats.bytes_down == 8 * 32  # every byte through, echoed


async def test_bandwidth_cap_throttles_a_1mb_upload(echo_server: int) -> None:
    """1 MB through an 8 Mbit/s uplink takes about one second (the echo comes back over an unlimited downlink)."""
    profile = LinkProfile("test", up=Direction(0.0, 0.0, 8 * MBIT), down=Direction(), handshake=False)
    payload = bytes(range(256)) * 4096  # 1 MiB
    async with LinkEmulator(("127.0.0.1", echo_server), profile) as link:
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        start = time.perf_counter()

        async def send() -> None:
            writer.write(payload)
            await writer.drain()

        sender = asyncio.create_task(send())
        echoed = await asyncio.wait_for(reader.readexactly(len(payload)), 10.0)
        elapsed = time.perf_counter() - start
        await sender
        writer.close()
        assert link.stats.bytes_up == len(payload)
    assert echoed == payload
    expected = len(payload) * 8 / (8 * MBIT)  # 1.05 s: the last byte cannot leave before the cap lets it
    assert elapsed >= expected * 0.95, elapsed


async def test_jitter_never_reorders_bytes(echo_server: int) -> None:
    profile = LinkProfile.symmetric("test", 0.005, 50 * MBIT, jitter_s=0.004)
    async with LinkEmulator(("127.0.0.1", echo_server), profile) as link:
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        sent = b"".join(i.to_bytes(4, "big") for i in range(2000))
        for i in range(0, len(sent), 40):
            writer.write(sent[i : i + 40])
            await asyncio.sleep(0)
        await writer.drain()
        got = await asyncio.wait_for(reader.readexactly(len(sent)), 10.0)
        writer.close()
    assert got == sent


async def test_cut_holds_data_and_restore_delivers_it(echo_server: int) -> None:
    profile = LinkProfile.symmetric("test", 0.005, None)
    async with LinkEmulator(("127.0.0.1", echo_server), profile) as link:
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        await _ping(reader, writer)
        link.cut()
        writer.write(b"held")
        await writer.drain()
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.readexactly(4), 0.3)
        assert not reader.at_eof()  # a black hole, not a closed connection
        link.restore()
        assert await asyncio.wait_for(reader.readexactly(4), 2.0) == b"held"
        writer.close()


async def test_new_connections_hang_while_cut(echo_server: int) -> None:
    async with LinkEmulator(("127.0.0.1", echo_server), PROFILES["none"]) as link:
        link.cut()
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)  # the kernel accepts...
        writer.write(b"ping")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.readexactly(4), 0.3)  # ...but nothing gets through
        link.restore()
        assert await asyncio.wait_for(reader.readexactly(4), 2.0) == b"ping"
        writer.close()


async def test_reset_closes_connections_and_new_ones_work(echo_server: int) -> None:
    async with LinkEmulator(("127.0.0.1", echo_server), PROFILES["lan"]) as link:
        reader, writer = await asyncio.open_connection("127.0.0.1", link.port)
        await _ping(reader, writer)
        assert link.stats.open_connections == 1
        link.reset()
        try:
            data = await asyncio.wait_for(reader.read(10), 2.0)
            assert data == b""
        except ConnectionResetError:
            pass
        writer.close()
        reader2, writer2 = await asyncio.open_connection("127.0.0.1", link.port)
        assert await _ping(reader2, writer2) >= 0.0  # the new connection echoes
        writer2.close()
        assert link.stats.resets == 1 and link.stats.connections == 2


async def test_profiles_match_the_issue() -> None:
    wan, cell, lan = PROFILES["wan"], PROFILES["cellular"], PROFILES["lan"]
    assert wan.up.latency_s == wan.down.latency_s == 0.030 and wan.up.bandwidth_bps == 20 * MBIT
    assert cell.rtt_s == pytest.approx(0.120)
    assert cell.down.bandwidth_bps == 5 * MBIT and cell.up.bandwidth_bps == 2 * MBIT
    assert lan.up.latency_s == 0.001 and lan.down.bandwidth_bps == 1000 * MBIT


async def _http(port: int, method: str, path: str) -> dict:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.0\r\n\r\n".encode())
    raw = await asyncio.wait_for(reader.read(), 5.0)
    writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200"), head
    return json.loads(body)


async def test_command_line_proxy_with_control_port(echo_server: int, unused_tcp_port_factory) -> None:
    listen, control = unused_tcp_port_factory(), unused_tcp_port_factory()
    proc = subprocess.Popen(
        [sys.executable, "-m", "offramp.shared.cli", "bench", "link-emulator", "--listen", f"127.0.0.1:{listen}",
         "--target", f"127.0.0.1:{echo_server}", "--profile", "lan", "--latency-ms", "10", "--control", f"127.0.0.1:{control}"],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert "link emulator" in await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 20.0)
        for _ in range(100):  # the control line follows the proxy's
            try:
                stats = await _http(control, "GET", "/stats")
                break
            except OSError:
                await asyncio.sleep(0.05)
        assert stats["profile"] == "lan" and stats["cut"] is False
        reader, writer = await asyncio.open_connection("127.0.0.1", listen)
        await _ping(reader, writer)
        assert await _ping(reader, writer) >= 0.019
        assert (await _http(control, "POST", "/cut"))["cut"] is True
        writer.write(b"abcd")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(reader.readexactly(4), 0.3)
        await _http(control, "POST", "/restore")
        assert await asyncio.wait_for(reader.readexactly(4), 2.0) == b"abcd"
        assert (await _http(control, "POST", "/reset"))["resets"] == 1
        writer.close()
        slow = await _http(control, "POST", "/profile?name=lan&latency_ms=60")  # a named profile, slowed down
        assert slow["profile"] == "lan" and slow["rtt_ms"] == 120
        reader, writer = await asyncio.open_connection("127.0.0.1", listen)
        await _ping(reader, writer)
        assert await _ping(reader, writer) >= 0.119
        writer.close()
    finally:
        proc.terminate()
        proc.wait(10)
    assert proc.returncode == 0
