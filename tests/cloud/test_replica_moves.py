"""A session that moves between cloud replicas and comes back is never resumed on a stale copy.

Engines (several replicas' session tables) behind one link that sends each request where a schedule says, as a
ring change or a failover would; the real decode loop drives them, with an exit head wrong often enough that drafts
are rejected and epochs move on. A copy left behind still holds positions from before rollbacks made elsewhere:
it must be trusted only below the first position that differs. What could resume one wrongly, each tested: a
rebase worked out against one copy reaching another (refused since protocol 3's `base_epoch`), and an answer lost
on the way back (the copy may have rejected a draft unseen, reaching an epoch number another copy also reaches;
harmless, because the lost block's drafts become final fallback tokens, so no later rollback goes below them)."""

from __future__ import annotations

import itertools
import random

import numpy as np
import pytest
import torch

from offramp.cloud.local_link import local_link
from offramp.edge.decode_loop import CLOUD, FALLBACK, CollaborativeDecoder, DecodeOptions
from offramp.edge.link import CloudUnavailableError
from offramp.edge.runtime import EdgeStep
from offramp.models.reference_runtime import TorchEdgeRuntime
from offramp.models.split import EdgePart
from tests.cloud.conftest import K, LAYERS

PROMPTS = [[5, 17, 3, 99, 42, 8], [1, 2, 3], list(range(30, 52))]


class MovingLink:
    """Two replicas' links; request i goes to replicas[route(i)]. `lose` lists requests whose answer is lost after
    the replica ran them (a connection dropped on the way back)."""

    def __init__(self, model, route, lose=(), replicas: int = 2) -> None:
        self.replicas = [local_link(model, K) for _ in range(replicas)]
        self.route = route
        self.lose = set(lose)
        self.calls = itertools.count()
        self.deep_layers = self.replicas[0].deep_layers
        self.stats = self.replicas[0].stats
        self.visits: list[int] = []

    async def open_session(self, session_id, stats=None) -> None:
        await self.replicas[self.route(0)].open_session(session_id, stats)

    async def extend(self, request, stats=None):
        i = next(self.calls)
        replica = self.route(i)
        self.visits.append(replica)
        result = await self.replicas[replica].extend(request, stats)
        if i in self.lose:
            raise CloudUnavailableError("the answer was lost on the way back")
        return result

    async def close_session(self, session_id, stats=None) -> None:
        for link in self.replicas:
            link.engine.contexts.close(session_id)

    async def aclose(self) -> None:
        return None


def full_argmax(model, tokens: list[int]) -> list[int]:
    """The full model's greedy next token after every prefix of `tokens`."""
    with torch.inference_mode():
        return model(torch.tensor([tokens])).logits[0].argmax(-1).tolist()


class OftenWrong(TorchEdgeRuntime):
    """An exit head wrong at every third position: drafts are rejected, epochs move on, copies left behind go stale."""

    def run(self, input_ids: list[int]) -> EdgeStep:
        step = super().run(input_ids)
        if self.length % 3:
            return step
        logits = step.logits.copy()
        logits[int(logits.argmax())] = -np.inf
        return EdgeStep(logits, step.hidden)


async def run(model, link, prompt, n=40) -> tuple[list[int], list[str]]:
    decoder = CollaborativeDecoder(OftenWrong(EdgePart(model, K)), link, LAYERS, confidence=lambda lg, h: 1.0)
    events = [e async for e in decoder.stream(prompt, DecodeOptions(max_new_tokens=n, max_draft=4))]
    decoder.close()
    return [e.token_id for e in events], [e.source for e in events]


def stays_then_moves(period: int, replicas: int = 2):
    """A few requests on one replica, the next few on the next, and round again: every move leaves a copy behind."""
    return lambda i: (i // period) % replicas


@pytest.mark.parametrize("period", [1, 2, 3, 5])
async def test_moving_back_and_forth_gives_the_full_models_tokens(model, period) -> None:
    for prompt in PROMPTS:
        link = MovingLink(model, stays_then_moves(period))
        tokens, sources = await run(model, link, prompt)
        assert set(sources) == {CLOUD}
        assert tokens == full_argmax(model, prompt + tokens)[len(prompt) - 1: -1]
        assert set(link.visits) == {0, 1}


def wandering(seed: int, replicas: int = 3):
    """Each request stays where the last one went, or (30% of the time) goes to a replica picked at random."""
    rng = random.Random(seed)
    where = [0]
    for _ in range(4000):
        where.append(rng.randrange(replicas) if rng.random() < 0.3 else where[-1])
    return where.__getitem__


async def test_rebases_worked_out_against_another_copy_are_refused(model) -> None:
    """Three replicas, sessions wandering between them: the edge works a rebase out against copy X (epoch x) and
    the frame reaches copy Y, older (y < x). Y must refuse it (its copy may hold rows from before a rollback made
    between y and x, below the rebase's start) and say what it holds; the edge rebases against Y instead."""
    refused = 0
    for seed in (0, 5, 9):
        link = MovingLink(model, wandering(seed), replicas=3)
        for replica in link.replicas:
            engine, prepare = replica.engine, replica.engine.prepare

            def watched(req, engine=engine, prepare=prepare):
                nonlocal refused
                ctx = engine.contexts.peek(req.session_id)
                refused += bool(req.rebase and ctx is not None and ctx.epoch < req.epoch and req.base_epoch > ctx.epoch)
                return prepare(req)

            engine.prepare = watched
        for prompt in PROMPTS:
            tokens, sources = await run(model, link, prompt)
            assert set(sources) == {CLOUD}
            assert tokens == full_argmax(model, prompt + tokens)[len(prompt) - 1: -1]
    assert refused > 0  # the hazard came up, and the tokens are still the full model's


@pytest.mark.parametrize("lost", [2, 3, 5, 8])
async def test_a_lost_answer_then_a_move_and_back_never_resumes_a_stale_copy(model, lost) -> None:
    """Request `lost` ran on replica 0 but its answer never came: that copy may have rejected a draft unseen and
    reached the epoch number replica 1 reaches next with its own rejections. The session moves to replica 1 and
    comes back. The lost block's tokens are edge fallbacks; every token the cloud decided is the full model's
    argmax on the emitted prefix."""
    for prompt in PROMPTS:
        link = MovingLink(model, lambda i: 0 if i <= lost or i > lost + 6 else 1, lose={lost})
        tokens, sources = await run(model, link, prompt)
        truth = full_argmax(model, prompt + tokens)[len(prompt) - 1: -1]
        cloud = [i for i, s in enumerate(sources) if s == CLOUD]
        assert cloud and all(tokens[i] == truth[i] for i in cloud)
        assert FALLBACK in sources or tokens == truth
        assert link.visits.count(1) > 0 and link.visits[-1] == 0
