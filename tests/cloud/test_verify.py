"""The cloud verifies edge drafts: greedy by argmax, sampled by speculative sampling; epochs make pipelined
requests behind a rejection stale, and a copy held at an older epoch is never resumed without a rebase."""

from __future__ import annotations

import numpy as np
import pytest

from offramp.cloud.context import ContextManager
from offramp.cloud.engine import DeepEngine
from offramp.models.split import CloudPart
from offramp.shared.contract import ContextMismatchError, ExtendRequest, StaleRequestError
from offramp.shared.sampling import SamplingParams, SparseDistribution, draw_draft, position_uniforms, token_distribution
from tests.conftest import make_tiny_llama
from tests.stats import assert_distributed_as

K = 2
TRIALS = 2000


@pytest.fixture(scope="module")
def model():
    return make_tiny_llama(num_layers=4, seed=5)


def engine(model) -> DeepEngine:
    eng = DeepEngine(CloudPart(model, K), ContextManager())
    eng.contexts.open("s")
    return eng


def rows(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, 64)).astype(np.float32)


def reference_predictions(model, hidden: np.ndarray) -> list[int]:
    eng = engine(model)
    return eng.extend(ExtendRequest("s", 0, hidden, want_token=False)).predicted


def test_drafts_equal_to_the_argmax_are_all_accepted(model) -> None:
    hidden = rows(5, 1)
    truth = reference_predictions(model, hidden)
    eng = engine(model)
    out = eng.extend(ExtendRequest("s", 0, hidden, want_token=False, drafts=truth))
    assert (out.accepted, out.token, out.length, out.epoch) == (5, None, 5, 0)
    assert len(out.token_logprobs) == 5 and all(lp <= 0 for lp in out.token_logprobs)


def test_the_first_wrong_draft_is_replaced_and_what_follows_dropped(model) -> None:
    hidden = rows(6, 2)
    truth = reference_predictions(model, hidden)
    drafts = list(truth)
    drafts[2] = (truth[2] + 1) % 128
    eng = engine(model)
    out = eng.extend(ExtendRequest("s", 0, hidden, want_token=False, drafts=drafts))
    # rows 0..2 hold tokens the cloud agrees with; row 3 onward was the edge's guess after the wrong draft
    assert (out.accepted, out.token, out.length, out.epoch) == (2, truth[2], 3, 1)
    assert out.predicted == truth
    ctx = eng.contexts.get("s")
    assert (ctx.length, ctx.epoch) == (3, 1)


def test_requests_pipelined_behind_a_rejection_are_stale_and_cost_nothing(model) -> None:
    hidden = rows(4, 3)
    truth = reference_predictions(model, hidden)
    eng = engine(model)
    eng.extend(ExtendRequest("s", 0, hidden[:2], want_token=False, drafts=[truth[0], (truth[1] + 1) % 128]))
    done = eng.layer_tokens
    with pytest.raises(StaleRequestError) as err:  # sent at epoch 0, before the edge heard of the rejection
        eng.extend(ExtendRequest("s", 2, hidden[2:], epoch=0, want_token=False, drafts=truth[2:]))
    assert (err.value.epoch, err.value.length) == (1, 2) and eng.layer_tokens == done
    out = eng.extend(ExtendRequest("s", 2, hidden[2:3], epoch=1))  # the edge's next block, at the new epoch
    assert out.length == 3 and out.token == reference_predictions(model, np.concatenate([hidden[:2], hidden[2:3]]))[-1]


def test_a_pick_follows_the_drafts_when_all_pass(model) -> None:
    hidden = rows(4, 4)
    truth = reference_predictions(model, hidden)
    out = engine(model).extend(ExtendRequest("s", 0, hidden, drafts=truth[1:3], top_logprobs=3))
    # row 0 is catch-up, rows 1 and 2 check the drafts, the last row's prediction is the cloud's pick
    assert (out.accepted, out.token, out.length) == (2, truth[3], 4)
    assert len(out.token_logprobs) == 3 and [ids[0] for ids in out.top_ids] == [truth[1], truth[2], truth[3]]


def test_a_copy_at_an_older_epoch_is_resumed_only_by_a_rebase(model) -> None:
    hidden = rows(6, 6)
    eng = engine(model)
    eng.extend(ExtendRequest("s", 0, hidden[:4], want_token=False))
    with pytest.raises(ContextMismatchError) as err:  # the edge rolled back elsewhere (epoch 3) since this copy
        eng.extend(ExtendRequest("s", 4, hidden[4:], epoch=3))
    assert (err.value.have, err.value.epoch) == (4, 0)
    with pytest.raises(ContextMismatchError) as err:  # a rebase worked out against another copy (epoch 2) is refused
        eng.extend(ExtendRequest("s", 2, hidden[2:], epoch=3, rebase=True, base_epoch=2))
    assert (err.value.have, err.value.epoch) == (4, 0)
    out = eng.extend(ExtendRequest("s", 2, hidden[2:], epoch=3, rebase=True, base_epoch=0))  # the edge knows rows 0..1 still hold
    assert (out.length, out.epoch) == (6, 3)
    assert out.predicted == reference_predictions(model, hidden)[2:]


def test_greedy_ignores_draft_distributions(model) -> None:
    hidden = rows(2, 7)
    truth = reference_predictions(model, hidden)
    q = [SparseDistribution(np.array([truth[0]]), np.array([1.0]))]
    out = engine(model).extend(ExtendRequest("s", 0, hidden, drafts=[truth[0]], draft_q=q))
    assert out.accepted == 1 and out.token == truth[1]


def test_speculative_sampling_gives_the_full_models_distribution(model) -> None:
    """Whatever the draft distribution q, the token the cloud settles is distributed as the full model's p:
    accepted drafts (min(1, p/q)) and residual resamples (max(0, p - q)) add up to p. Fixed seeds."""
    sampling = SamplingParams(temperature=0.3)  # a tiny random model is nearly uniform at 1.0
    prefix = rows(3, 8)
    eng = engine(model)
    eng.extend(ExtendRequest("s", 0, prefix[:2], want_token=False))
    logits = DeepEngine(CloudPart(model, K), ContextManager())
    logits.contexts.open("r")
    row_logits = _row_logits(logits, prefix)
    p = token_distribution(row_logits, sampling)
    # q: a skewed guess over a few tokens, some likely under p and some not (so both paths are taken)
    support = np.argsort(-p)[[0, 1, 5, 20, 60]]
    q = SparseDistribution(support, np.array([0.1, 0.5, 0.2, 0.15, 0.05]))
    counts = np.zeros(len(p))
    accepted = 0
    epoch = 0
    for seed in range(TRIALS):
        draft = draw_draft(q, position_uniforms(seed, 3).draft)
        out = eng.extend(ExtendRequest("s", 2, prefix[2:], epoch=epoch, want_token=False, drafts=[draft], draft_q=[q],
                                       sampling=sampling, seed=seed))
        token = draft if out.accepted else out.token
        counts[token] += 1
        accepted += out.accepted
        epoch = out.epoch
    assert 0.05 * TRIALS < accepted < 0.95 * TRIALS, accepted  # both outcomes happen
    assert_distributed_as(counts, p)


def _row_logits(eng: DeepEngine, prefix: np.ndarray) -> np.ndarray:
    """The deep layers' logits at the last row of `prefix` (what the cloud verifies the first draft against)."""
    import torch

    ctx = eng.contexts.get("r")
    out = eng._forward([(ExtendRequest("r", 0, prefix, want_token=False), ctx)])[0]
    return out[-1].detach().to(torch.float32).numpy()
