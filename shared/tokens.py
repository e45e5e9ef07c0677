"""Token ids both sides agree on without talking: where a generation stops."""

from __future__ import annotations

from typing import Any

END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


def stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """EOS plus the end-of-turn tokens of common chat templates that this vocabulary has."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    vocab = tokenizer.get_vocab()
    ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
    return tuple(sorted(ids))
