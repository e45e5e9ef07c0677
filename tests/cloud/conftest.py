"""A real cloud server on a loopback port, in the test's own event loop, around a tiny random model."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from offramp.cloud.auth import BearerAuth
from offramp.cloud.config import CloudConfig
from offramp.cloud.server import CloudState, make_app
from offramp.models.reference_runtime import TorchEdgeRuntime
from offramp.edge.ws_link import WebSocketCloudLink
from offramp.models.fingerprint import model_fingerprint
from offramp.models.split import EdgePart
from tests.conftest import make_tiny_llama

K = 2
LAYERS = 4


class RunningCloud:
    def __init__(self, state: CloudState, runner: web.AppRunner) -> None:
        self.state = state
        self.runner = runner
        self.port = runner.addresses[0][1]
        self.url = f"ws://127.0.0.1:{self.port}"
        self.http_url = f"http://127.0.0.1:{self.port}"

    def manifest(self, **overrides) -> dict:
        """What an edge graph's manifest says about itself (the link's hello is built from it)."""
        m = {"model_fingerprint": self.state.fingerprint, "exit_layer": self.state.config.exit_layer,
             "hidden_size": self.state.hidden_size, "num_layers": LAYERS}
        return m | overrides

    def link(self, codec: str = "fp32", **kwargs) -> WebSocketCloudLink:
        manifest = kwargs.pop("manifest", None) or self.manifest()
        return WebSocketCloudLink(self.url, codec=codec, manifest=manifest, **kwargs)


@contextlib.asynccontextmanager
async def running_cloud(model, token: str | None = None, **config) -> AsyncIterator[RunningCloud]:
    cfg = CloudConfig(model="tiny", exit_layer=config.pop("exit_layer", K), port=0, **config)
    state = CloudState(cfg, model, None, model_fingerprint(model), BearerAuth(token), model_name="tiny")
    runner = web.AppRunner(make_app(state), shutdown_timeout=5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield RunningCloud(state, runner)
    finally:
        await runner.cleanup()


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(num_layers=LAYERS, seed=11)


@pytest.fixture
def edge_runtime(model):
    return lambda: TorchEdgeRuntime(EdgePart(model, K))
