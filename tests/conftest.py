"""Shared fixtures: the real default model (converted once, cached under $OFFRAMP_HOME) and tiny random models."""

from __future__ import annotations

import os

# Before torch starts OpenMP: threads that sleep instead of spinning when they wait. With spinning (the default) a
# tiny model's step took 25 ms instead of 1.5 on this 2-core machine as soon as another process used a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402

from offramp.models.tiny import make_tiny_llama, save_tiny_checkpoint  # noqa: E402,F401 (tests import them from here)


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer) for SmolLM2-135M-Instruct; the first run converts the GGUF (~30 s), later runs read the cache."""
    from offramp.models import load_model

    return load_model("default")


@pytest.fixture(scope="session")
def tiny_model() -> LlamaForCausalLM:
    return make_tiny_llama()
