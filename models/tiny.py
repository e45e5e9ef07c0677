"""Tiny random Llamas: for tests, the soak and the bench, wherever real weights are not the point.

They run in milliseconds, and a saved one (`save_tiny_checkpoint`) starts `offramp cloud serve` or
`offramp edge serve --model DIR` in seconds.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from offramp.models.checkpoints import cpu_matmul_layout


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
        cpu_matmul_layout(model)
    return model


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
