"""The cloud-only baseline: every layer in the cloud, what a user would deploy without offramp."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from transformers import PreTrainedModel

from offramp.models.architecture import Geometry, check_supported
from offramp.models.decoder import KV, run_layers
from offramp.shared.sampling import SamplingParams, pick_token


class FullModelRunner:
    """Greedy or sampled decoding with the whole model, step by step with a KV cache."""

    def __init__(self, model: PreTrainedModel) -> None:
        check_supported(model)
        self.model = model.eval()
        self.geometry = Geometry.of(model)
        self.layer_tokens = 0

    @torch.inference_mode()
    def _forward(self, ids: list[int], start: int, past: list[KV] | None) -> tuple[np.ndarray, list[KV]]:
        inner = self.model.model
        hidden = inner.embed_tokens(torch.tensor([ids]))
        positions = torch.arange(start, start + len(ids))[None]
        hidden, present = run_layers(inner.layers, inner.rotary_emb, hidden, positions, past)
        logits = self.model.lm_head(inner.norm(hidden[:, -1:]))
        self.layer_tokens += len(ids) * self.geometry.num_layers
        return logits[0, -1].float().numpy(), present

    def generate_ids(
        self,
        prompt_ids: Sequence[int],
        max_new_tokens: int,
        sampling: SamplingParams = SamplingParams(),
        seed: int | None = None,
        stop_ids: Sequence[int] = (),
    ) -> Iterator[int]:
        """Yield new token ids; stops at a stop id, max_new_tokens or the context length."""
        if not prompt_ids:
            raise ValueError("the prompt must contain at least one token")
        rng = np.random.default_rng(seed)
        logits, past = self._forward(list(prompt_ids), 0, None)
        length = len(prompt_ids)
        for produced in range(1, max_new_tokens + 1):
            token = pick_token(logits, sampling, float(rng.random()))
            yield token
            if token in stop_ids or length >= self.geometry.max_positions or produced == max_new_tokens:
                return
            logits, past = self._forward([token], length, past)
            length += 1
