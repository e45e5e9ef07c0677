"""Real processes for the bench: `offramp cloud serve` and the link emulator, started, watched and stopped.

Like llama.cpp's `ServerProcess`: fields mirror the CLI flags, `start()` polls the health endpoint with a
deadline, every wait is bounded, and `stop()` always reaps the child. Cloud CPU time is read from
/proc/<pid>/stat (all threads), so the bench measures what the cloud process really spent per mode.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_thread_env() -> dict[str, str]:
    """Every process of the bench gets one intra-op thread: on two shared cores, torch's default (all cores, spin
    waits) is 6-10x slower per step as soon as another process runs, and it would differ from mode to mode."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    return env


@dataclass(frozen=True)
class CorePlan:
    """Which cores the edge (the bench process) and the cloud servers run on: in a deployment
    they are different machines, so on a shared box they must not steal each other's core. Empty: no pinning."""

    edge: tuple[int, ...] = ()
    cloud: tuple[int, ...] = ()

    @classmethod
    def split(cls) -> "CorePlan":
        """The first allowed core for the edge, the rest for the cloud side; no pinning on a single core."""
        cores = sorted(os.sched_getaffinity(0))
        return cls((cores[0],), tuple(cores[1:])) if len(cores) >= 2 else cls()

    def pin_this_process(self) -> None:
        """Pin the calling thread (call it before any worker thread starts: new threads inherit it)."""
        if self.edge:
            os.sched_setaffinity(0, self.edge)

    def cloud_preexec(self):
        """A `preexec_fn` that pins a child (and every thread it will start) to the cloud's cores."""
        if not self.cloud:
            return None
        cores = self.cloud
        return lambda: os.sched_setaffinity(0, cores)


def cpu_seconds(pid: int) -> float:
    """user + system CPU seconds of a live process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK  # utime, stime (fields 14, 15 of stat)


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _post(url: str, timeout: float = 5.0) -> dict:
    req = urllib.request.Request(url, data=b"", method="POST")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read() or b"{}")


@dataclass
class CloudServer:
    """`offramp cloud serve` as a child process."""

    model: str = "default"
    exit_layer: int = 15
    port: int = field(default_factory=free_port)
    extra_args: list[str] = field(default_factory=list)
    log_path: Path | None = None
    proc: subprocess.Popen | None = None
    health_path: str = "/healthz"
    cores: CorePlan = field(default_factory=CorePlan)
    process_group: bool = False  # stop every process the server starts with it (a Ray cloud's replicas and agents)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "offramp.shared.cli", "cloud", "serve", "--model", self.model,
                "--exit-layer", str(self.exit_layer), "--host", "127.0.0.1", "--port", str(self.port),
                "--threads", "1", *self.extra_args]

    def start(self, timeout_s: float = 240.0) -> "CloudServer":
        self.launch()
        return self.wait_healthy(timeout_s)

    def launch(self) -> None:
        """Start the process without waiting (several servers then load their models side by side)."""
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=one_thread_env(),
                                     preexec_fn=self.cores.cloud_preexec(), start_new_session=self.process_group)

    def wait_healthy(self, timeout_s: float = 240.0) -> "CloudServer":
        """Poll /healthz until it answers 200; a process that exits or stays unhealthy past the deadline raises."""
        assert self.proc is not None, "launch() first"
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cloud server exited with {self.proc.returncode}; see {self.log_path}")
            try:
                status, _ = _get(self.base_url + self.health_path, 1.0)
                if status == 200:
                    return self
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"cloud server not healthy within {timeout_s:.0f} s; see {self.log_path}")

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        return cpu_seconds(self.proc.pid)

    def metrics(self) -> str:
        try:
            status, body = _get(self.base_url + "/metrics", 5.0)
            return body.decode() if status == 200 else ""
        except OSError:
            return ""

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self._signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self._signal(signal.SIGKILL)
            self.proc.wait(5)

    def _signal(self, sig: int) -> None:
        assert self.proc is not None
        if self.process_group:
            os.killpg(self.proc.pid, sig)
        else:
            self.proc.send_signal(sig)

    def __enter__(self) -> "CloudServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class EmulatedLink:
    """`python -m offramp.bench.link_emulator` in its own process (so the edge's compute cannot delay its timers)."""

    target_port: int
    profile: str = "wan"
    port: int = field(default_factory=free_port)
    control_port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def control_url(self) -> str:
        return f"http://127.0.0.1:{self.control_port}"

    def start(self, timeout_s: float = 30.0) -> "EmulatedLink":
        cmd = [sys.executable, "-m", "offramp.bench.link_emulator", "--listen", f"127.0.0.1:{self.port}",
               "--target", f"127.0.0.1:{self.target_port}", "--profile", self.profile,
               "--control", f"127.0.0.1:{self.control_port}"]
        # Not pinned: it is the network, light but timer-bound; on the cloud's busy core its delays would grow.
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=one_thread_env())
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                self.stats()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"link emulator exited with {self.proc.returncode}") from None
                time.sleep(0.1)
        self.stop()
        raise TimeoutError("link emulator did not start")

    def stats(self) -> dict:
        status, body = _get(self.control_url + "/stats", 2.0)
        return json.loads(body)

    def set_profile(self, name: str) -> None:
        _post(f"{self.control_url}/profile?name={name}")
        self.profile = name

    def wire_bytes(self) -> tuple[int, int]:
        s = self.stats()
        return int(s["bytes_up"]), int(s["bytes_down"])

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def __enter__(self) -> "EmulatedLink":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
