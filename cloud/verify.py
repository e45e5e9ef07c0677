"""Deciding a request's tokens from the deep layers' logits: verify the edge's drafts, pick the cloud's token.

Greedy: a draft is accepted when it is the full model's argmax. Sampled: speculative sampling against the
edge's sparse q (`offramp.shared.sampling.verify_draft`), with each position's uniforms from (seed, position), so
the tokens are distributed as the full model's whichever way the edge cut its blocks. The first rejected draft is
replaced by the cloud's token and every row after it is dropped from the session.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from offramp.shared.contract import ExtendRequest
from offramp.shared.sampling import pick_token, position_uniforms, token_distribution, verify_draft


@dataclass
class Verdict:
    accepted: int  # drafts accepted, in order
    token: int | None  # the replacement of the first rejected draft, or the pick after the last row
    rows_kept: int  # rows of the request whose KV stays valid
    decided_rows: list[int]  # the rows whose predictions settled a token (accepted drafts, then `token`)
    rejected: bool  # a draft was rejected (the session's epoch moves on)


def decide(req: ExtendRequest, logits: torch.Tensor) -> Verdict:
    """The outcome of one request; `logits` [rows, V] are the deep layers' outputs for its rows."""
    n = req.rows
    first = req.first_checked_row
    greedy = req.sampling.greedy
    argmax = logits.argmax(dim=-1).tolist() if greedy else None
    for j, draft in enumerate(req.drafts):
        row = first + j
        position = req.start + row + 1  # the position this row's prediction fills
        if greedy:
            ok, token = argmax[row] == draft, argmax[row]
        else:
            assert req.draft_q is not None
            p = token_distribution(logits[row].float().cpu().numpy(), req.sampling)
            ok, token = verify_draft(p, req.draft_q[j], int(draft), position_uniforms(req.seed, position))
        if not ok:  # this row's KV is valid (its token was right); the rows after it hold the rejected draft
            return Verdict(j, int(token), row + 1, list(range(first, row + 1)), True)
    decided = list(range(first, first + len(req.drafts)))
    if not req.want_token:
        return Verdict(len(req.drafts), None, n, decided, False)
    last = n - 1
    if greedy:
        token = int(argmax[last])
    else:
        token = pick_token(logits[last].float().cpu().numpy(), req.sampling, position_uniforms(req.seed, req.start + n).sample)
    return Verdict(len(req.drafts), token, n, decided + [last], False)


def token_logprobs(logits: torch.Tensor, rows: list[int], tokens: list[int], top: int) -> tuple[list[float], list[list[int]], list[list[float]]]:
    """Log-probs (temperature 1, the model's own) of the decided tokens, and the `top` best alternatives at each."""
    if not rows:
        return [], [], []
    logp = torch.log_softmax(logits[rows].float(), dim=-1)
    chosen = logp.gather(-1, torch.tensor(tokens, device=logp.device)[:, None])[:, 0].tolist()
    if top <= 0:
        return chosen, [], []
    values, ids = logp.topk(top, dim=-1)
    return chosen, ids.tolist(), values.tolist()


def argmax_logprobs(logits: torch.Tensor) -> tuple[list[int], list[float]]:
    """The full model's argmax at every row and its log-prob (for the edge's online agreement checks)."""
    logits = logits.float()
    predicted = logits.argmax(dim=-1)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, predicted[:, None])[:, 0]
    return predicted.tolist(), logp.tolist()
