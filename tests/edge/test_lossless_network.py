"""Lossless collaboration, the default mode, over a real WebSocket with the ONNX edge graph on the default model.

With the fp32 graph and the fp32 codec the cloud receives exactly the layer-K states the full model has, so the
output must be the full model's greedy output token for token, whatever the edge drafts and however its blocks
are cut; and sampled generations must be reproducible by seed across pipelining depths.
"""

from __future__ import annotations

import pytest

from offramp.cloud.full_model import FullModelRunner
from offramp.edge.config import EdgeConfig
from offramp.edge.decode_loop import CLOUD
from offramp.edge.service import EdgeService
from offramp.edge.text_stream import TextRequest
from offramp.shared.sampling import SamplingParams
from tests.cloud.conftest import running_cloud

pytestmark = pytest.mark.slow

QUESTIONS = ["Why is the sky blue?", "Name three uses of copper.", "Write one sentence about the Moon."]


def service_on(edge_dir, url: str, **fields) -> EdgeService:
    return EdgeService.open(EdgeConfig(edge=edge_dir, precision="fp32", cloud=url, codec="fp32", workers=1, **fields))


async def test_lossless_over_the_network_is_the_full_models_greedy_output(default_model, default_edge_dir) -> None:
    model, _ = default_model
    runner = FullModelRunner(model)
    async with running_cloud(model, exit_layer=15) as cloud:
        for fixed in (1, 0, 6):  # one draft at a time, adaptive depth, deep speculation
            svc = service_on(default_edge_dir, cloud.url, fixed_draft=fixed)
            try:
                for question in QUESTIONS:
                    prompt = svc.encode_chat([{"role": "user", "content": question}])
                    result = await svc.generate(TextRequest(prompt, 32)).collect()
                    assert set(result.sources) == {CLOUD}, (fixed, question, result.sources)
                    assert result.token_ids == list(runner.generate_ids(prompt, 32, stop_ids=svc.stop_ids)), (fixed, question)
                    assert result.stats.round_trips >= 1 and result.stats.fallback_tokens == 0
            finally:
                await svc.aclose()


async def test_lossless_sampling_over_the_network_is_reproducible_at_any_depth(default_model, default_edge_dir) -> None:
    runs = []
    async with running_cloud(default_model[0], exit_layer=15) as cloud:
        for fixed in (1, 5, 0):
            svc = service_on(default_edge_dir, cloud.url, fixed_draft=fixed)
            try:
                prompt = svc.encode_chat([{"role": "user", "content": QUESTIONS[0]}])
                result = await svc.generate(TextRequest(prompt, 24, SamplingParams(temperature=1.0), seed=42)).collect()
                assert set(result.sources) == {CLOUD}
                runs.append(result.token_ids)
            finally:
                await svc.aclose()
    assert runs[0] == runs[1] == runs[2]
