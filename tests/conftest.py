"""Shared fixtures: the real default model (converted once, cached under $OFFRAMP_HOME) and tiny random models."""

from __future__ import annotations

import os

# Before torch starts OpenMP: threads that sleep instead of spinning when they wait. With spinning (the default) a
# tiny model's step took 25 ms instead of 1.5 on this 2-core machine as soon as another process used a core.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402


@pytest.fixture(scope="session")
def default_model():
    """(model, tokenizer) for SmolLM2-135M-Instruct; the first run converts the GGUF (~30 s), later runs read the cache."""
    from offramp.models import load_model

    return load_model("default")


def make_tiny_llama(num_layers: int = 4, seed: int = 0, cpu_layout: bool = True, **overrides) -> LlamaForCausalLM:
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
    if cpu_layout:  # as load_model does, so processes that load its checkpoint compute alike (not for saving)
        from offramp.models.checkpoints import cpu_matmul_layout

        cpu_matmul_layout(model)
    return model


@pytest.fixture(scope="session")
def tiny_model() -> LlamaForCausalLM:
    return make_tiny_llama()


def save_tiny_checkpoint(path: Path, num_layers: int = 4, seed: int = 0, **overrides) -> Path:
    """A tiny random Llama plus a word-level tokenizer ("t0".."t{V-1}", no EOS) saved where `--model DIR` loads it.

    Real processes (`offramp cloud serve`, `offramp edge serve`) start in seconds on it, and with no stop token a
    generation always runs to max_tokens, so fault tests can count on its length.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model = make_tiny_llama(num_layers, seed, cpu_layout=False, **overrides)
    vocab = {f"t{i}": i for i in range(model.config.vocab_size)}
    words = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model.save_pretrained(path)
    PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0").save_pretrained(path)
    return path
