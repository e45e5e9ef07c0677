"""`decoder_layer` exit head: one trainable decoder layer (attention + FFN) over the layer-K stream, with its own KV.

As Kangaroo, Hydra++ and EAGLE do, the head sees past positions: it is a trainable copy of a Llama decoder layer
appended after layer K-1, then the tuned final norm and the model's frozen LM head. The layer-K states the edge
uploads stay the output of layer K-1 (the cloud contract does not change); the head's own K/V for every position
live in the edge graph's KV cache next to the edge layers' (`kv_layers = 1`: the manifest's `head_kv_layers`), so
prefill, decode steps and the decode loop's truncate/rollback treat them like any other layer's.

Training runs on whole sequences (causal attention): `TeacherData.context` holds the layer-K states of every
position of every corpus sequence (`teacher.add_context`), and `SequenceRows` groups the teacher rows by sequence
so a batch is a few right-padded sequences whose scored positions are distilled. `exit_logits` is what judging
code uses for any head: position-wise heads read the cached layer-K state of each row, context heads run over the
row's sequence.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator

import torch
from torch import nn
from transformers import PreTrainedModel

from offramp.models.decoder import KV, run_layers
from offramp.models.exit_heads import head_kv_layers, register_head
from offramp.models.heads import _final_norm, check_config_keys
from offramp.models.teacher import TeacherData
from offramp.shared.errors import SplitConfigError


class DecoderLayerHead(nn.Module):
    """A trainable decoder layer + tuned final norm + frozen LM head.

    `init_layer`: the layer whose weights it starts from (negative counts from the end: -1, the last layer, is the
    measured best, see `offramp.models.heads`), None for random projections; `zero_output` zeroes o_proj and
    down_proj so the head starts as the untrained baseline.
    """

    kind = "decoder_layer"
    kv_layers = 1

    def __init__(self, model: PreTrainedModel, init_layer: int | None = None, zero_output: bool = False) -> None:
        super().__init__()
        n = model.config.num_hidden_layers
        if init_layer is not None and (not isinstance(init_layer, int) or not -n <= init_layer <= n - 1):
            raise SplitConfigError(
                f"decoder_layer init_layer {init_layer!r} is out of range 0..{n - 1} (negative: from the end; null: random)"
            )
        self.init_layer, self.zero_output = init_layer, bool(zero_output)
        self.layer = copy.deepcopy(model.model.layers[0 if init_layer is None else init_layer])
        self.layer.requires_grad_(True)
        if init_layer is None:  # random projections, unit norms (as a freshly built layer)
            std = getattr(model.config, "initializer_range", 0.02)
            with torch.no_grad():
                for name, p in self.layer.named_parameters():
                    if "layernorm" in name:
                        p.fill_(1.0)
                    else:
                        p.normal_(0.0, std)
        if self.zero_output:  # the layer starts as the identity: the head starts as the untrained baseline
            with torch.no_grad():
                self.layer.self_attn.o_proj.weight.zero_()
                self.layer.mlp.down_proj.weight.zero_()
        self.rotary = model.model.rotary_emb  # no parameters
        self.norm = _final_norm(model)
        self.lm_head = model.lm_head  # shared and frozen: not saved with the head

    def run(
        self, hidden: torch.Tensor, position_ids: torch.Tensor, past: list[KV] | None = None, explicit_mask: bool = False
    ) -> tuple[torch.Tensor, list[KV]]:
        """Normed features [batch, q, H] of the new positions, and the head's present KV (past + new)."""
        x, present = run_layers([self.layer], self.rotary, hidden, position_ids, past or None, explicit_mask)
        return self.norm(x), present

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of whole sequences [batch, seq, H] starting at position 0 (no cache)."""
        if hidden.dim() != 3:
            raise SplitConfigError(
                f"the {self.kind} head attends over past positions: give it [batch, seq, H] sequences, not {tuple(hidden.shape)}"
            )
        positions = torch.arange(hidden.shape[1])[None].expand(hidden.shape[0], -1)
        return self.lm_head(self.run(hidden, positions)[0])

    def config(self) -> dict:
        return {"init_layer": self.init_layer, "zero_output": self.zero_output}


def _build_decoder_layer(model: PreTrainedModel, cfg: dict) -> DecoderLayerHead:
    return DecoderLayerHead(model, **check_config_keys(DecoderLayerHead.kind, cfg, {"init_layer", "zero_output"}))


register_head(DecoderLayerHead.kind, _build_decoder_layer)


# --- sequences of the teacher data, for training and judging context heads -----------------------------------


class SequenceRows:
    """Teacher rows grouped by sequence: for each sequence, its context span and the positions of its rows."""

    def __init__(self, data: TeacherData, rows: torch.Tensor, exit_layer: int) -> None:
        if exit_layer not in data.context or data.context_span is None or data.context_row is None:
            raise SplitConfigError(
                f"the teacher data has no layer-{exit_layer} sequence context; a head that sees past positions needs "
                "it (offramp.models.teacher.add_context)"
            )
        self.context = data.context[exit_layer]
        rows = rows.sort().values
        seq = data.seq[rows].long()
        _, counts = torch.unique_consecutive(seq, return_counts=True)
        self.rows = list(torch.split(rows, counts.tolist()))  # each sequence's rows are contiguous in the data
        starts = data.context_span[seq, 0]
        self.start = [int(s[0]) for s in torch.split(starts, counts.tolist())]
        self.pos = list(torch.split(data.context_row[rows] - starts, counts.tolist()))

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, groups: list[int], limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(states [B, L, H] right-padded, (batch, position) index of each scored row, the rows) for some sequences;
        `limit` keeps only that many rows in all (the last sequence's are cut)."""
        rows, pos = [self.rows[g] for g in groups], [self.pos[g] for g in groups]
        if limit is not None:
            kept, total = [], 0
            for r in rows:
                kept.append(min(len(r), max(limit - total, 0)))
                total += kept[-1]
            rows, pos = [r[:n] for r, n in zip(rows, kept)], [p[:n] for p, n in zip(pos, kept)]
        width = max(int(p[-1]) + 1 for p in pos if len(p))
        x = torch.zeros(len(groups), width, self.context.shape[1])
        for b, (g, p) in enumerate(zip(groups, pos)):
            if len(p):
                n = int(p[-1]) + 1
                x[b, :n] = self.context[self.start[g] : self.start[g] + n].float()
        index = torch.cat([torch.stack([torch.full_like(p, b), p], 1) for b, p in enumerate(pos)])
        return x, index, torch.cat(rows)


def run_sequences(head: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """A context head's features over right-padded sequences from position 0 (causal: padding never leaks back)."""
    positions = torch.arange(x.shape[1])[None].expand(x.shape[0], -1)
    return head.run(x, positions)[0]


def sample_groups(seqs: SequenceRows, batch_tokens: int, gen: torch.Generator) -> list[int]:
    """Random sequences until their rows reach batch_tokens (the batch then cuts the last one to exactly that)."""
    groups, total = [], 0
    while total < batch_tokens:
        g = int(torch.randint(len(seqs), (1,), generator=gen))
        groups.append(g)
        total += len(seqs.rows[g])
    return groups


@torch.no_grad()
def exit_logits(
    head: nn.Module, data: TeacherData, exit_layer: int, idx: torch.Tensor, chunk: int = 256
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(rows, head logits) over the rows `idx` (ascending), `chunk` rows at a time, for any head kind."""
    if not head_kv_layers(head):
        for start in range(0, len(idx), chunk):
            sel = idx[start : start + chunk]
            yield sel, head(data.hidden[exit_layer][sel].float())
        return
    seqs = SequenceRows(data, idx, exit_layer)
    group, rows = [], 0
    for g in range(len(seqs) + 1):
        if group and (g == len(seqs) or rows + len(seqs.rows[g]) > chunk):
            x, index, sel = seqs.batch(group)
            feats = run_sequences(head, x)[index[:, 0], index[:, 1]]
            yield sel, head.lm_head(feats)
            group, rows = [], 0
        if g < len(seqs):
            group.append(g)
            rows += len(seqs.rows[g])
