"""Synthetic corpora over tiny random models, shared by the exit-head tests."""

from __future__ import annotations

import torch

from offramp.models.corpus import TextSequence, split_of


def synthetic_sequences(n: int = 60, length: int = 40, vocab: int = 128, seed: int = 0) -> list[TextSequence]:
    """Random token documents, half 'chat' (scored after an 8-token prompt), half human text; split by doc id."""
    g = torch.Generator().manual_seed(seed)
    seqs = []
    for i in range(n):
        source, score_from = ("chat", 8) if i % 2 == 0 else ("stdlib", 1)
        ids = torch.randint(3, vocab, (length,), generator=g).tolist()
        seqs.append(TextSequence(f"doc{i}", source, split_of(f"doc{i}"), ids, score_from))
    return seqs


def perturbed(head: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """A head with random weights, as if trained (what the exporter tests can build too)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in head.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return head.eval()
