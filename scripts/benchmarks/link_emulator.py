"""A user-space WAN emulator: an asyncio TCP proxy that delays, throttles, cuts and resets the edge-cloud link.

Kernel traffic shaping (tc netem) is not available here, so benchmarks and fault tests put this proxy between
edge and cloud instead. Each direction of each connection is a pipe with a bandwidth (serialization delay, one
segment after another) followed by a one-way propagation delay with optional jitter; delivery order is kept,
as TCP would. A new connection pays one round trip before its first byte moves (the TCP handshake), so a
client that opens a connection per request pays what it would on a real WAN.

Faults, for the reliability tests:
- `cut()`: a black hole. Sockets stay open, nothing moves in either direction (new connections hang too)
  until `restore()`; then held data flows on, as TCP retransmission would deliver it.
- `reset()`: close every connection now (both sides see the connection drop); new ones are accepted.

In process: `async with LinkEmulator(("127.0.0.1", 8700), WAN) as link: connect to link.port`.
Command line: `offramp bench link-emulator --listen 127.0.0.1:9000 --target 127.0.0.1:8700
--profile wan [--control 127.0.0.1:9001]`; the control port takes `POST /cut`, `/restore`, `/reset`,
`/profile?name=lan[&latency_ms=500&jitter_ms=..&up_mbit=..&down_mbit=..]` and `GET /stats`, so a benchmark or
test can drive a proxy running in its own process (a fault test makes the link slower than the edge's timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import sys
from dataclasses import asdict, dataclass, field, replace

UP, DOWN = "up", "down"  # up: client (edge) -> target (cloud); down: target -> client
_READ_SIZE = 64 * 1024
_QUEUE_SEGMENTS = 512  # per direction; a full queue stops reading, so the sender is back-pressured as by TCP


@dataclass(frozen=True)
class Direction:
    """One direction of a link: propagation delay, jitter (std-dev, normal, clipped at zero), bandwidth."""

    latency_s: float = 0.0
    jitter_s: float = 0.0
    bandwidth_bps: float | None = None  # bits per second; None is unlimited

    def __post_init__(self) -> None:
        if self.latency_s < 0 or self.jitter_s < 0:
            raise ValueError(f"latency and jitter must be >= 0, got {self.latency_s}, {self.jitter_s}")
        if self.bandwidth_bps is not None and self.bandwidth_bps <= 0:
            raise ValueError(f"bandwidth must be > 0 bit/s or None, got {self.bandwidth_bps}")

    def serialization_s(self, nbytes: int) -> float:
        return 0.0 if self.bandwidth_bps is None else nbytes * 8.0 / self.bandwidth_bps

    @property
    def segment_bytes(self) -> int:
        """Segments of about 2 ms of transmission time (at least one MSS), so big writes trickle out smoothly."""
        if self.bandwidth_bps is None:
            return _READ_SIZE
        return int(min(_READ_SIZE, max(1460, self.bandwidth_bps / 8 * 0.002)))


@dataclass(frozen=True)
class LinkProfile:
    """A named pair of directions. `up` is edge -> cloud, `down` is cloud -> edge."""

    name: str
    up: Direction = field(default_factory=Direction)
    down: Direction = field(default_factory=Direction)
    handshake: bool = True  # a new connection waits one round trip before data moves

    @property
    def rtt_s(self) -> float:
        return self.up.latency_s + self.down.latency_s

    @classmethod
    def symmetric(cls, name: str, latency_s: float, bandwidth_bps: float | None, jitter_s: float = 0.0) -> "LinkProfile":
        d = Direction(latency_s, jitter_s, bandwidth_bps)
        return cls(name, d, d)

    def describe(self) -> str:
        def mbit(d: Direction) -> str:
            return "unlimited" if d.bandwidth_bps is None else f"{d.bandwidth_bps / 1e6:g} Mbit/s"

        return (
            f"{self.name}: {self.up.latency_s * 1e3:g} ms up / {self.down.latency_s * 1e3:g} ms down one-way"
            f" (jitter {self.up.jitter_s * 1e3:g}/{self.down.jitter_s * 1e3:g} ms), {mbit(self.up)} up / {mbit(self.down)} down"
        )


MBIT = 1e6
PROFILES: dict[str, LinkProfile] = {
    "none": LinkProfile("none", handshake=False),  # a plain relay: the proxy's own overhead
    "lan": LinkProfile.symmetric("lan", 0.001, 1000 * MBIT),
    "wan": LinkProfile.symmetric("wan", 0.030, 20 * MBIT, jitter_s=0.002),
    "cellular": LinkProfile(
        "cellular",
        up=Direction(0.060, 0.008, 2 * MBIT),
        down=Direction(0.060, 0.008, 5 * MBIT),
    ),
}


def get_profile(name: str) -> LinkProfile:
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown link profile {name!r}; known: {sorted(PROFILES)}") from None


@dataclass
class LinkStats:
    connections: int = 0  # accepted so far
    open_connections: int = 0
    bytes_up: int = 0  # delivered to the target
    bytes_down: int = 0  # delivered to the client
    resets: int = 0


class _Pipe:
    """One direction of one connection: read, schedule (serialization + propagation), deliver in order."""

    def __init__(self, emu: "LinkEmulator", direction: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, start_at: float) -> None:
        self.emu = emu
        self.direction = direction
        self.reader = reader
        self.writer = writer
        self.queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(_QUEUE_SEGMENTS)
        self.link_free_at = start_at  # when the pipe finishes sending what it has been given
        self.last_delivery = start_at

    @property
    def shape(self) -> Direction:
        profile = self.emu.profile
        return profile.up if self.direction == UP else profile.down

    def _schedule(self, nbytes: int, now: float) -> float:
        shape = self.shape
        self.link_free_at = max(self.link_free_at, now) + shape.serialization_s(nbytes)
        delay = shape.latency_s
        if shape.jitter_s:
            delay = max(0.0, self.emu.rng.gauss(shape.latency_s, shape.jitter_s))
        self.last_delivery = max(self.last_delivery, self.link_free_at + delay)  # keep order
        return self.last_delivery

    async def read_side(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                data = await self.reader.read(_READ_SIZE)
                if not data:
                    break
                await self.emu._link_up.wait()  # cut: stop taking data in; the sender's buffers fill up
                seg = self.shape.segment_bytes
                for i in range(0, len(data), seg):
                    piece = data[i : i + seg]
                    await self.queue.put((self._schedule(len(piece), loop.time()), piece))
        except (ConnectionError, OSError):
            pass
        finally:
            await self.queue.put(None)

    async def write_side(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            item = await self.queue.get()
            if item is None:
                break
            deliver_at, data = item
            if not self.emu._link_up.is_set():
                await self.emu._link_up.wait()  # held during a cut, then delivered one propagation delay later
                deliver_at = max(deliver_at, loop.time() + self.shape.latency_s)
            delay = deliver_at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            await self.emu._link_up.wait()
            self.writer.write(data)
            await self.writer.drain()
            if self.direction == UP:
                self.emu.stats.bytes_up += len(data)
            else:
                self.emu.stats.bytes_down += len(data)
        if self.writer.can_write_eof():
            with contextlib.suppress(OSError, RuntimeError):
                self.writer.write_eof()


class LinkEmulator:
    """A shaping TCP proxy from `listen` to `target`; start with `async with` or `start()`/`aclose()`."""

    def __init__(
        self,
        target: tuple[str, int],
        profile: LinkProfile | str = "lan",
        listen: tuple[str, int] = ("127.0.0.1", 0),
        seed: int | None = 0,
    ) -> None:
        self.target = target
        self.listen = listen
        self.profile = get_profile(profile) if isinstance(profile, str) else profile
        self.rng = random.Random(seed)
        self.stats = LinkStats()
        self._server: asyncio.base_events.Server | None = None
        self._conns: set[asyncio.Task] = set()
        self._writers: set[asyncio.StreamWriter] = set()
        self._link_up = asyncio.Event()
        self._link_up.set()
        self.port = 0

    @property
    def address(self) -> str:
        return f"{self.listen[0]}:{self.port}"

    @property
    def is_cut(self) -> bool:
        return not self._link_up.is_set()

    async def start(self) -> "LinkEmulator":
        self._server = await asyncio.start_server(self._handle, self.listen[0], self.listen[1])
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def aclose(self) -> None:
        """Stop listening and drop every connection."""
        self._link_up.set()
        if self._server is not None:
            self._server.close()
        self._abort_all()
        if self._conns:
            await asyncio.wait(list(self._conns), timeout=2.0)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            self._server = None

    async def __aenter__(self) -> "LinkEmulator":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def set_profile(self, profile: LinkProfile | str) -> None:
        """Change shaping on the fly (applies to data read from now on)."""
        self.profile = get_profile(profile) if isinstance(profile, str) else profile

    def cut(self) -> None:
        """Black hole: keep sockets open, move nothing, until restore()."""
        self._link_up.clear()

    def restore(self) -> None:
        self._link_up.set()

    def reset(self) -> None:
        """Close every open connection at once (the endpoints see a reset); later connections work."""
        self.stats.resets += 1
        self._abort_all()

    def _abort_all(self) -> None:
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()
        for task in list(self._conns):
            task.cancel()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._conns.add(task)
        self._writers.add(client_w)
        self.stats.connections += 1
        self.stats.open_connections += 1
        loop = asyncio.get_running_loop()
        target_w: asyncio.StreamWriter | None = None
        try:
            await self._link_up.wait()  # a cut link: the connect hangs, like an unanswered SYN
            target_r, target_w = await asyncio.wait_for(asyncio.open_connection(*self.target), 10.0)
            self._writers.add(target_w)
            # The handshake: the client's first byte can leave only after SYN / SYN-ACK (one round trip).
            start = loop.time() + (self.profile.rtt_s if self.profile.handshake else 0.0)
            up = _Pipe(self, UP, client_r, target_w, start)
            down = _Pipe(self, DOWN, target_r, client_w, loop.time())
            await _run_all(up.read_side(), up.write_side(), down.read_side(), down.write_side())
        except (ConnectionError, OSError, asyncio.TimeoutError, asyncio.CancelledError):
            pass
        finally:
            self.stats.open_connections -= 1
            for w in (client_w, target_w):
                if w is not None:
                    self._writers.discard(w)
                    w.close()
            self._conns.discard(task)


async def _run_all(*coros) -> None:
    """Run the four halves of a connection; the first failure (a reset, a broken pipe) ends them all."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for t in done:
            t.result()
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# ---------------------------------------------------------------------------------------------------- command line


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def override(
    profile: LinkProfile,
    latency_ms: float | None = None,
    jitter_ms: float | None = None,
    up_mbit: float | None = None,
    down_mbit: float | None = None,
) -> LinkProfile:
    """The profile with any of its numbers replaced (latency and jitter: one-way, both directions)."""
    up, down = profile.up, profile.down
    if latency_ms is not None:
        up, down = replace(up, latency_s=latency_ms / 1e3), replace(down, latency_s=latency_ms / 1e3)
    if jitter_ms is not None:
        up, down = replace(up, jitter_s=jitter_ms / 1e3), replace(down, jitter_s=jitter_ms / 1e3)
    if up_mbit is not None:
        up = replace(up, bandwidth_bps=up_mbit * MBIT)
    if down_mbit is not None:
        down = replace(down, bandwidth_bps=down_mbit * MBIT)
    return replace(profile, up=up, down=down)


def profile_from_args(args: argparse.Namespace) -> LinkProfile:
    """A named profile with any of its numbers overridden on the command line."""
    return override(get_profile(args.profile), args.latency_ms, args.jitter_ms, args.up_mbit, args.down_mbit)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="offramp bench link-emulator", description=__doc__.split("\n")[0])
    p.add_argument("--listen", type=_hostport, default=("127.0.0.1", 9000))
    p.add_argument("--target", type=_hostport, required=True)
    p.add_argument("--profile", choices=sorted(PROFILES), default="wan")
    p.add_argument("--latency-ms", type=float, default=None, help="one-way latency, both directions")
    p.add_argument("--jitter-ms", type=float, default=None)
    p.add_argument("--up-mbit", type=float, default=None, help="edge -> cloud bandwidth")
    p.add_argument("--down-mbit", type=float, default=None, help="cloud -> edge bandwidth")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--control", type=_hostport, default=None, help="HTTP control port: POST /cut /restore /reset /profile?name=")
    return p


async def _serve_control(emu: LinkEmulator, where: tuple[str, int]) -> asyncio.base_events.Server:
    """A tiny HTTP/1.0 control plane (no framework: the proxy must not depend on the cloud's server stack)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            path, _, query = target.partition("?")
            params = dict(kv.partition("=")[::2] for kv in query.split("&") if kv)
            status, body = 200, {}
            if method == "POST" and path == "/cut":
                emu.cut()
            elif method == "POST" and path == "/restore":
                emu.restore()
            elif method == "POST" and path == "/reset":
                emu.reset()
            elif method == "POST" and path == "/profile":
                numbers = {k: float(params[k]) for k in ("latency_ms", "jitter_ms", "up_mbit", "down_mbit") if k in params}
                emu.set_profile(override(get_profile(params.get("name", "")), **numbers))
            elif method == "GET" and path == "/stats":
                pass
            else:
                status = 404
            shape = {"profile": emu.profile.name, "rtt_ms": round(emu.profile.rtt_s * 1e3, 3), "cut": emu.is_cut}
            body = {**shape, **asdict(emu.stats)} if status == 200 else {"error": "not found"}
        except ValueError as exc:
            status, body = 400, {"error": str(exc)}
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        payload = json.dumps(body).encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found"}[status]
        writer.write(
            f"HTTP/1.0 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
            + payload
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, where[0], where[1])


async def _main(args: argparse.Namespace) -> None:
    emu = LinkEmulator(args.target, profile_from_args(args), args.listen, args.seed)
    await emu.start()
    control = await _serve_control(emu, args.control) if args.control else None
    print(f"link emulator {emu.address} -> {args.target[0]}:{args.target[1]}  {emu.profile.describe()}", flush=True)
    if control is not None:
        print(f"control http://{args.control[0]}:{control.sockets[0].getsockname()[1]}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    if control is not None:
        control.close()
    await emu.aclose()


def main(argv: list[str] | None = None) -> int:
    asyncio.run(_main(build_parser().parse_args(argv)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
