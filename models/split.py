"""Split a decoder at layer K into an edge part (embeddings, layers 0..K-1, exit head) and a cloud part.

Composing the two reproduces the full model: the cloud part continues from the edge's layer-K hidden state.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PreTrainedModel

from offramp.models.architecture import Geometry, check_exit_layer, check_supported
from offramp.models.decoder import KV, run_layers
from offramp.models.exit_heads import FinalNormHead, head_kv_layers
from offramp.shared.errors import SplitConfigError


@dataclass
class EdgeOutput:
    exit_logits: torch.Tensor  # [batch, q_len, vocab]: the exit head's next-token logits
    hidden: torch.Tensor  # [batch, q_len, H]: layer-K hidden state, what the cloud continues from
    present: list[KV]  # the edge layers' KV, then the head's own (if it attends: head_kv_layers)


class EdgePart(nn.Module):
    """Embeddings, decoder layers 0..K-1 and an exit head.

    With `first_layer` > 0 it is one segment of a multi-exit edge (offramp.edge.multi_exit): layers
    first_layer..K-1 and the exit head at K, fed the layer-`first_layer` hidden states instead of token ids.
    """

    def __init__(self, model: PreTrainedModel, exit_layer: int, head: nn.Module | None = None, first_layer: int = 0) -> None:
        super().__init__()
        check_supported(model)
        check_exit_layer(model, exit_layer)
        if not 0 <= first_layer < exit_layer:
            raise SplitConfigError(f"a segment's first layer {first_layer!r} must be in 0..{exit_layer - 1} (below its exit layer {exit_layer})")
        self.exit_layer = exit_layer
        self.first_layer = first_layer
        self.geometry = Geometry.of(model)
        self.embed_tokens = model.model.embed_tokens if first_layer == 0 else None
        self.layers = nn.ModuleList(model.model.layers[first_layer:exit_layer])
        self.rotary_emb = model.model.rotary_emb
        self.head = head if head is not None else FinalNormHead(model)
        self.head_kv_layers = head_kv_layers(self.head)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[KV] | None = None,
        explicit_mask: bool = False,
        last_only: bool = False,
    ) -> EdgeOutput:
        """`input_ids`: token ids [batch, q_len] (or, for a later segment, layer-`first_layer` states [batch, q_len, H]);
        `past`: the edge layers' KV, then the head's; `last_only`: exit logits of the last position only."""
        k = len(self.layers)
        hidden = self.embed_tokens(input_ids) if self.embed_tokens is not None else input_ids
        hidden, present = run_layers(self.layers, self.rotary_emb, hidden, position_ids, None if past is None else past[:k], explicit_mask)
        if self.head_kv_layers:  # the head attends: it runs over every new position, keeping its own KV
            feats, head_present = self.head.run(hidden, position_ids, None if past is None else past[k:], explicit_mask)
            logits = self.head.lm_head(feats[:, -1:] if last_only else feats)
            return EdgeOutput(logits, hidden, present + head_present)
        return EdgeOutput(self.head(hidden[:, -1:] if last_only else hidden), hidden, present)


class CloudPart(nn.Module):
    """Decoder layers K..N-1, the final norm and the LM head.

    `CloudPart(model, 0, whole_model=True)` is every layer: the cloud-only baseline then runs through the same
    engine and batcher as collaborative sessions, so the two are served alike.
    """

    def __init__(self, model: PreTrainedModel, exit_layer: int, whole_model: bool = False) -> None:
        super().__init__()
        check_supported(model)
        if not (whole_model and exit_layer == 0):
            check_exit_layer(model, exit_layer)
        self.exit_layer = exit_layer
        self.geometry = Geometry.of(model)
        self.layers = nn.ModuleList(model.model.layers[exit_layer:])
        self.rotary_emb = model.model.rotary_emb
        self.norm = model.model.norm
        self.lm_head = model.lm_head

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def forward(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[KV] | None = None,
        attn_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[KV]]:
        hidden, present = run_layers(self.layers, self.rotary_emb, hidden, position_ids, past, attn_mask=attn_mask)
        return self.lm_head(self.norm(hidden)), present


def split_model(model: PreTrainedModel, exit_layer: int, head: nn.Module | None = None) -> tuple[EdgePart, CloudPart]:
    """Both halves, sharing the model's weights (no copy)."""
    return EdgePart(model, exit_layer, head), CloudPart(model, exit_layer)
