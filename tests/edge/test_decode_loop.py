"""The decode loop's state machine on a scripted runtime and cloud (tests/edge/fakes.py), no weights: which tokens
come out, from where, and what went over the link, for lossless (pipelined or not), exit mode with lazy/eager
catch-up, eviction, fallback and refusal. Assertions are on emitted tokens, sources and link calls only."""

from __future__ import annotations

import asyncio

import pytest

from offramp.edge.decode_loop import CLOUD, EDGE, FALLBACK, CollaborativeDecoder, DecodeOptions
from offramp.edge.link import CloudRefusedError
from tests.edge.fakes import (
    FakeCloudLink,
    ScriptedRuntime,
    confident_unless,
    edge_guess,
    greedy,
    never_confident,
    truth_agreeing_except,
)

PROMPT = [5, 9, 2, 7]
P = len(PROMPT)
N = 16


async def decode(runtime, link, options: DecodeOptions, confidence=never_confident, prompt=PROMPT, on_token=None):
    decoder = CollaborativeDecoder(runtime, link, 4, confidence)
    tokens, sources = [], []
    async for event in decoder.stream(prompt, options):
        tokens.append(event.token_id)
        sources.append(event.source)
        if on_token is not None:
            on_token(len(tokens))
    return tokens, sources, decoder.stats


def uploaded_positions(link: FakeCloudLink) -> list[int]:
    return [p for c in link.extend_calls() for p in c.positions]


def exit_mode(**kwargs) -> DecodeOptions:
    return DecodeOptions(max_new_tokens=N, threshold=0.5, lossless=False, **kwargs)


async def test_one_draft_at_a_time_every_token_is_the_clouds_and_each_position_goes_up_once() -> None:
    truth = truth_agreeing_except({6, 9, 12})
    link = FakeCloudLink(truth)
    tokens, sources, _ = await decode(ScriptedRuntime(), link, DecodeOptions(max_new_tokens=N, fixed_draft=1))
    assert tokens == greedy(truth, PROMPT, N) and sources == [CLOUD] * N
    calls = link.extend_calls()
    assert [(c.start, c.rows) for c in calls] == [(0, P)] + [(P + i, 1) for i in range(N - 1)]
    assert all(len(c.drafts) == 1 for c in calls)  # each request verifies the edge's guess for the next position
    assert [c.kind for c in link.calls][0] == "open" and link.calls[-1].kind == "close"


@pytest.mark.parametrize("depth", [0, 2, 6], ids=["adaptive", "fixed2", "fixed6"])
async def test_lossless_emits_exactly_the_clouds_greedy_tokens_at_any_depth(depth) -> None:
    truth = truth_agreeing_except({P + 3, P + 4, P + 10})
    runtime, link = ScriptedRuntime(), FakeCloudLink(truth)

    async def round_trip() -> None:  # far slower than a scripted edge step, as over a WAN: drafts pile up meanwhile
        await asyncio.sleep(0.05)

    link.before_answer = round_trip
    tokens, sources, stats = await decode(runtime, link, DecodeOptions(max_new_tokens=N, fixed_draft=depth), lambda lg, h: 1.0)
    assert tokens == greedy(truth, PROMPT, N) and set(sources) == {CLOUD}
    assert runtime.truncations  # the drafts grown from the wrong guesses were rolled back
    if depth != 2:  # deep enough for drafts to pile up while a verification is out
        assert stats.round_trips < N  # several drafts verified per round trip
    assert stats.rejected_drafts == 3 and stats.draft_rollbacks == 3
    held = list(PROMPT) + tokens[:-1]
    assert runtime.tokens == held  # what the edge holds is the emitted sequence, nothing rejected
    epochs = [c.epoch for c in link.extend_calls()]
    assert epochs == sorted(epochs) and epochs[-1] == 3  # one epoch per rejection, never going back


async def test_exited_tokens_are_the_edges_and_catch_up_rides_on_the_next_verification() -> None:
    escalated = {P + 3, P + 7, P + 8, P + 12}
    truth = truth_agreeing_except(set(range(100)))  # the cloud never agrees: its tokens are visibly its own
    link = FakeCloudLink(truth)
    tokens, sources, stats = await decode(ScriptedRuntime(), link, exit_mode(fixed_draft=1), confident_unless(escalated))
    assert [P + i for i, s in enumerate(sources) if s == CLOUD] == sorted(escalated)
    seq = list(PROMPT)
    for token, source in zip(tokens, sources):  # each token is the edge's guess or the cloud's, given what came before
        assert token == (truth(seq) if source == CLOUD else edge_guess(seq))
        seq.append(token)
    calls = link.extend_calls()
    assert [c.start + c.rows for c in calls] == sorted(escalated)  # each request uploads up to the position it verifies ...
    assert uploaded_positions(link) == list(range(max(escalated)))  # ... and no position twice
    assert all(len(c.drafts) == 1 for c in calls)  # exited tokens are never sent as drafts: only the escalated one
    assert stats.checked_exits > 0


async def test_exit_mode_speculating_deeper_or_uploading_eagerly_changes_no_token() -> None:
    escalated = {P + 2, P + 6, P + 11}
    truth = truth_agreeing_except({P + 6})
    runs = {}
    for name, options in {"plain": exit_mode(fixed_draft=1), "deep": exit_mode(fixed_draft=4),
                          "eager": exit_mode(fixed_draft=1, catch_up="eager")}.items():
        link = FakeCloudLink(truth)
        runs[name] = (*(await decode(ScriptedRuntime(), link, options, confident_unless(escalated)))[:2], link)
    assert runs["plain"][0] == runs["deep"][0] == runs["eager"][0] == greedy(
        lambda seq: truth(seq) if len(seq) in escalated else edge_guess(seq), PROMPT, N)
    assert runs["plain"][1] == runs["deep"][1] == runs["eager"][1]
    assert not any(not c.drafts for c in runs["plain"][2].extend_calls())  # lazy: rows only ride with a verification
    eager_calls = runs["eager"][2].extend_calls()
    assert any(not c.drafts for c in eager_calls)  # eager: exited rows went up in requests of their own
    seen = sorted(set(uploaded_positions(runs["eager"][2])))
    assert seen == list(range(len(seen))) and len(seen) > len(set(uploaded_positions(runs["plain"][2])))


async def test_an_evicted_session_is_re_uploaded_from_what_the_cloud_holds() -> None:
    truth = truth_agreeing_except({P + 5})
    baseline, _, _ = await decode(ScriptedRuntime(), FakeCloudLink(truth), DecodeOptions(max_new_tokens=N, fixed_draft=1))
    link = FakeCloudLink(truth, evict_at=[3, 9], evict_to=2)
    tokens, sources, _ = await decode(ScriptedRuntime(), link, DecodeOptions(max_new_tokens=N, fixed_draft=1))
    assert tokens == baseline and sources == [CLOUD] * N
    calls = link.extend_calls()
    assert calls[2].start == P + 1 and calls[3].start == 2  # refused at P+1, re-uploaded from position 2
    assert calls[3].start + calls[3].rows == P + 2  # ... up to the row verifying the pending draft


async def test_an_unreachable_cloud_means_fallback_tokens_then_collaboration_resumes() -> None:
    truth = truth_agreeing_except(set(range(100)))
    link = FakeCloudLink(truth)

    def weather(n: int) -> None:  # down after the 3rd token, back after the 8th
        link.down = 3 <= n < 8

    tokens, sources, stats = await decode(ScriptedRuntime(), link, DecodeOptions(max_new_tokens=N, fixed_draft=1), on_token=weather)
    assert sources[:3] == [CLOUD] * 3 and FALLBACK in sources and sources[-1] == CLOUD
    first, last = sources.index(FALLBACK), len(sources) - 1 - sources[::-1].index(FALLBACK)
    assert set(sources[first : last + 1]) == {FALLBACK} and stats.fallback_tokens == last - first + 1
    seq = list(PROMPT)
    for token, source in zip(tokens, sources):
        assert token == (truth(seq) if source == CLOUD else edge_guess(seq))
        seq.append(token)
    # once back, the cloud got the fallback tokens' rows as catch-up: every position up to the last one verified
    assert sorted(set(uploaded_positions(link))) == list(range(P + N - 1))
    assert link.calls[-1].kind == "close"


async def test_lossless_without_a_cloud_still_completes_marked_fallback() -> None:
    link = FakeCloudLink()
    link.down = True
    tokens, sources, _ = await decode(ScriptedRuntime(), link, DecodeOptions(max_new_tokens=N), lambda lg, h: 1.0)
    assert tokens == greedy(edge_guess, PROMPT, N) and sources == [FALLBACK] * N


@pytest.mark.parametrize("when", ["open", "extend"])
async def test_a_refusal_is_an_error_not_fallback_tokens(when) -> None:
    link = FakeCloudLink()
    if when == "open":
        link.refuse = "unauthorized"
    else:
        async def refuse_now() -> None:
            link.refuse = "forbidden"

        link.before_answer = refuse_now
    with pytest.raises(CloudRefusedError) as err:
        await decode(ScriptedRuntime(), link, DecodeOptions(max_new_tokens=N))
    assert err.value.code == ("unauthorized" if when == "open" else "forbidden")


async def test_generation_stops_at_a_stop_id_and_sends_nothing_after() -> None:
    full = greedy(edge_guess, PROMPT, N)
    stop = full[5]
    link = FakeCloudLink()
    tokens, _, _ = await decode(ScriptedRuntime(), link, DecodeOptions(max_new_tokens=N, fixed_draft=1, stop_ids=[stop]))
    assert tokens == full[: full.index(stop) + 1]
    assert len(link.extend_calls()) == len(tokens) and link.calls[-1].kind == "close"


async def test_edge_standalone_runs_without_a_link() -> None:
    tokens, sources, _ = await decode(ScriptedRuntime(), None, DecodeOptions(max_new_tokens=N))
    assert tokens == greedy(edge_guess, PROMPT, N) and set(sources) == {EDGE}
