"""`--load-in-8bit`: bitsandbytes int8 decoder-layer weights, checked on CPU (bitsandbytes runs there too)."""

from __future__ import annotations

import sys

import aiohttp
import pytest
import torch

from offramp.cloud.int8_weights import Int8WeightsError, quantize_linear_layers, weight_bytes
from offramp.edge.decode_loop import CLOUD, CollaborativeDecoder, DecodeOptions
from offramp.models.reference_runtime import TorchEdgeRuntime
from offramp.models.split import CloudPart, EdgePart
from tests.cloud.conftest import K, LAYERS, running_cloud
from tests.conftest import make_tiny_llama

pytest.importorskip("bitsandbytes")


def tiny():
    # wider than the default tiny model so int8 rounding averages out as it does in real layers
    return make_tiny_llama(num_layers=LAYERS, seed=5, hidden_size=256, intermediate_size=512, vocab_size=256)


@torch.inference_mode()
def test_int8_layers_keep_the_deep_logits_close_and_shrink_the_weights() -> None:
    ref, quant = tiny(), tiny()
    before = weight_bytes(quant.model.layers)
    replaced = quantize_linear_layers(quant.model.layers, "cpu")
    assert replaced == LAYERS * 7  # q, k, v, o, gate, up, down per layer
    assert weight_bytes(quant.model.layers) < before / 3  # int8 weights, fp32 norms and scales
    hidden = torch.randn(1, 12, 256)
    positions = torch.arange(12)[None]
    want, _ = CloudPart(ref, K)(hidden, positions)
    got, _ = CloudPart(quant, K)(hidden, positions)
    rel = (got - want).norm() / want.norm()
    assert 0 < rel < 0.03, rel  # changed (really quantized) but close
    agree = (got.argmax(-1) == want.argmax(-1)).float().mean()
    assert agree >= 0.9, agree


def test_without_bitsandbytes_the_error_says_which_extra(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(Int8WeightsError, match=r"offramp\[gpu\]"):
        quantize_linear_layers(tiny().model.layers, "cpu")


async def test_server_with_int8_weights_serves_a_collaborative_generation() -> None:
    model = tiny()
    edge_model = tiny()  # the edge keeps full-precision weights; the server quantizes its own copy
    async with running_cloud(model, load_in_8bit=True) as cloud:
        async with aiohttp.ClientSession() as http, http.get(cloud.http_url + "/healthz") as resp:
            health = await resp.json()
        assert health["weights"] == "int8 (bitsandbytes)"
        assert type(model.model.layers[K].mlp.down_proj).__name__ == "Linear8bitLt"
        link = cloud.link("fp16")
        try:
            decoder = CollaborativeDecoder(TorchEdgeRuntime(EdgePart(edge_model, K)), link, LAYERS)
            events = [e async for e in decoder.stream([5, 9, 2, 7], DecodeOptions(max_new_tokens=8, threshold=1.5))]
        finally:
            await link.aclose()
        assert len(events) == 8 and {e.source for e in events} == {CLOUD}
        assert all(0 <= e.token_id < 256 for e in events)
