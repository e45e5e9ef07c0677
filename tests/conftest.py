"""Shared fixtures: the real default model (converted once, cached under $OFFRAMP_HOME) and tiny random models."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer) for SmolLM2-135M-Instruct; the first run converts the GGUF (~30 s), later runs read the cache."""
    from offramp.models import load_model

    return load_model("default")


def make_tiny_llama(num_layers: int = 4, seed: int = 0, **overrides) -> LlamaForCausalLM:
    """A random Llama small enough to run in milliseconds, for tests where real weights are not the point."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=overrides.pop("vocab_size", 128),
        hidden_size=overrides.pop("hidden_size", 64),
        intermediate_size=overrides.pop("intermediate_size", 128),
        num_hidden_layers=num_layers,
        num_attention_heads=overrides.pop("num_attention_heads", 4),
        num_key_value_heads=overrides.pop("num_key_value_heads", 2),
        max_position_embeddings=overrides.pop("max_position_embeddings", 256),
        tie_word_embeddings=overrides.pop("tie_word_embeddings", True),
        **overrides,
    )
    config._attn_implementation = "sdpa"
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def tiny_model() -> LlamaForCausalLM:
    return make_tiny_llama()
