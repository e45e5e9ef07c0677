"""Real processes for the fault and load tests: `offramp cloud serve` on a tiny random checkpoint, the link
emulator in its own process, and what the edge's tokens should have been (the full model, teacher-forced).

The process helpers are the bench's (`offramp.bench.processes`) and the edge daemon tests' (`DaemonProcess`), so
there is one way to start each process in this repository. Test modules import the fixtures they use from here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from offramp.bench.load_driver import wrong_cloud_tokens
from offramp.bench.processes import CloudServer, EmulatedLink, free_port
from tests.conftest import save_tiny_checkpoint

K = 2  # the edge runs layers 0..1 of the tiny model, the cloud 2..3
LAYERS = 4
CONTEXT = 4096  # long enough that a generation outlasts a fault, however fast the edge falls back
START_TIMEOUT_S = 120.0


class Cloud:
    """One `offramp cloud serve` on a fixed port that a test may kill, SIGTERM and restart on that same port."""

    def __init__(self, model_dir: Path, log_path: Path, extra_args: list[str] | None = None) -> None:
        self.server = CloudServer(model=str(model_dir), exit_layer=K, port=free_port(), extra_args=extra_args or [], log_path=log_path)

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.server.proc is not None
        return self.server.proc.pid

    def alive(self) -> bool:
        return self.server.proc is not None and self.server.proc.poll() is None

    def ensure(self) -> "Cloud":
        """Start it unless it is running (a test before this one may have killed it)."""
        if not self.alive():
            self.server.start(START_TIMEOUT_S)
        return self

    def kill(self) -> None:
        """SIGKILL: no drain, no goodbye; sockets die with the process."""
        if self.alive():
            assert self.server.proc is not None
            self.server.proc.kill()
            self.server.proc.wait(30)

    def log(self) -> str:
        path = self.server.log_path
        return Path(path).read_text(errors="replace") if path and Path(path).exists() else ""

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """The tiny random Llama + word-level tokenizer, as `--model DIR` for every process of these tests."""
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), num_layers=LAYERS, seed=11, max_position_embeddings=CONTEXT)


@pytest.fixture(scope="session")
def full_model(tiny_dir: Path):
    """The same weights in this process: the edge of the in-process decode loops, and the reference."""
    from offramp.models import load_model

    return load_model(str(tiny_dir))[0]


@pytest.fixture(scope="module")
def cloud(tiny_dir: Path, tmp_path_factory):
    server = Cloud(tiny_dir, tmp_path_factory.mktemp("cloud") / "cloud.log").ensure()
    yield server
    server.stop()


@pytest.fixture
def live_cloud(cloud: Cloud) -> Cloud:
    return cloud.ensure()


@pytest.fixture(scope="module")
def emulated_link(cloud: Cloud):
    """The link emulator between edge and cloud, in its own process so the edge's work cannot delay it."""
    with EmulatedLink(cloud.port, profile="lan") as link:
        yield link


def assert_cloud_tokens_are_the_full_models(model, prompt: list[int], tokens: list[int], sources: list[str]) -> int:
    """Every token the cloud chose is the full model's greedy choice given everything before it (its context was
    complete, whatever the edge emitted meanwhile). Returns how many cloud tokens were checked."""
    wrong, checked = wrong_cloud_tokens(model, prompt, tokens, sources)
    assert not wrong, f"cloud tokens at {wrong[:10]} are not the full model's choice (context not rebuilt?)"
    return checked
