"""The decode loop's state machine on a scripted runtime and cloud (tests/edge/fakes.py), no weights: which tokens
come out, from where, and what went over the link, for plain, lazy/eager catch-up, draft-ahead, lossless,
eviction, fallback and refusal. Assertions are on emitted tokens, sources and link calls only, so they hold for
any implementation of the loop."""

from __future__ import annotations

import pytest

from offramp.edge.generation import CLOUD, EDGE, FALLBACK, CollaborativeDecoder, DecodeOptions
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


async def test_every_token_escalated_is_the_clouds_and_each_position_goes_up_once() -> None:
    truth = truth_agreeing_except({6, 9, 12})
    link = FakeCloudLink(truth)
    tokens, sources, _ = await decode(ScriptedRuntime(), link, DecodeOptions(max_new_tokens=N, threshold=0.5))
    assert tokens == greedy(truth, PROMPT, N) and sources == [CLOUD] * N
    calls = link.extend_calls()
    assert [(c.start, c.rows) for c in calls] == [(0, P)] + [(P + i, 1) for i in range(N - 1)]
    assert all(c.want_token for c in calls)
    assert [c.kind for c in link.calls][0] == "open" and link.calls[-1].kind == "close"


async def test_exited_tokens_are_the_edges_and_catch_up_rides_on_the_next_escalation() -> None:
    escalated = {P + 3, P + 7, P + 8, P + 12}
    truth = truth_agreeing_except(set(range(100)))  # the cloud never agrees: its tokens are visibly its own
    link = FakeCloudLink(truth)
    tokens, sources, stats = await decode(ScriptedRuntime(), link, DecodeOptions(max_new_tokens=N, threshold=0.5), confident_unless(escalated))
    assert [P + i for i, s in enumerate(sources) if s == CLOUD] == sorted(escalated)
    seq = list(PROMPT)
    for token, source in zip(tokens, sources):  # each token is the edge's guess or the cloud's, given what came before
        assert token == (truth(seq) if source == CLOUD else edge_guess(seq))
        seq.append(token)
    calls = link.extend_calls()
    assert [c.start + c.rows for c in calls] == sorted(escalated)  # each escalation uploads up to its position ...
    assert uploaded_positions(link) == list(range(max(escalated)))  # ... and no position twice
    assert stats.checked_exits > 0


async def test_eager_catch_up_uploads_in_the_background_and_changes_no_token() -> None:
    escalated = {P + 4, P + 9}
    runs = {}
    for mode in ("lazy", "eager"):
        link = FakeCloudLink(truth_agreeing_except({P + 4}))
        runs[mode] = (*(await decode(ScriptedRuntime(), link, DecodeOptions(max_new_tokens=N, threshold=0.5, catch_up=mode),
                                     confident_unless(escalated)))[:2], link)
    (lazy_tokens, lazy_sources, lazy_link), (eager_tokens, eager_sources, eager_link) = runs["lazy"], runs["eager"]
    assert eager_tokens == lazy_tokens and eager_sources == lazy_sources
    assert not any(not c.want_token for c in lazy_link.extend_calls())
    assert any(not c.want_token for c in eager_link.extend_calls())  # uploads without asking for a token
    eager_seen, lazy_seen = sorted(set(uploaded_positions(eager_link))), sorted(set(uploaded_positions(lazy_link)))
    assert eager_seen == list(range(len(eager_seen))) and len(eager_seen) > len(lazy_seen)  # exits went up as they happened


async def test_draft_ahead_gives_the_plain_loops_tokens_and_rolls_back_a_wrong_guess() -> None:
    escalated = {P + 2, P + 6, P + 11}
    truth = truth_agreeing_except({P + 6})  # agrees with the edge's guess at P+2 and P+11, not at P+6
    plain_link, drafting_link = FakeCloudLink(truth), FakeCloudLink(truth)
    confidence = confident_unless(escalated)
    plain = await decode(ScriptedRuntime(), plain_link, DecodeOptions(max_new_tokens=N, threshold=0.5), confidence)
    runtime = ScriptedRuntime()
    drafted = await decode(runtime, drafting_link, DecodeOptions(max_new_tokens=N, threshold=0.5, draft_ahead=3), confidence)
    assert drafted[0] == plain[0] and drafted[1] == plain[1]
    assert [P + i for i, s in enumerate(plain[1]) if s == CLOUD] == sorted(escalated)
    assert P + 6 in runtime.truncations  # the drafts grown from the wrong guess at P+6 were rolled back
    assert drafted[2].drafted_tokens > 0  # the right guesses' drafts were kept
    assert [(c.start, c.rows) for c in drafting_link.extend_calls() if c.want_token][0] == (0, P + 2)


@pytest.mark.parametrize("max_draft", [1, 4])
async def test_lossless_emits_exactly_the_clouds_greedy_tokens(max_draft) -> None:
    truth = truth_agreeing_except({P + 3, P + 4, P + 10})
    runtime, link = ScriptedRuntime(), FakeCloudLink(truth)
    options = DecodeOptions(max_new_tokens=N, threshold=0.5, lossless=True, max_draft=max_draft)
    tokens, sources, _ = await decode(runtime, link, options, confidence=lambda lg, h: 1.0)
    assert tokens == greedy(truth, PROMPT, N)
    assert EDGE in sources and CLOUD in sources and FALLBACK not in sources
    calls = link.extend_calls()
    assert len(calls) < N  # several drafts verified per round trip
    if max_draft > 1:
        assert max(c.rows for c in calls[1:]) > 1 and runtime.truncations  # drafts rejected at P+3 / P+10 rolled back
    held = list(PROMPT) + tokens[:-1]
    assert runtime.tokens == held  # what the edge holds is the emitted sequence, nothing rejected


async def test_an_evicted_session_is_re_uploaded_from_what_the_cloud_holds() -> None:
    truth = truth_agreeing_except({P + 5})
    baseline, _, _ = await decode(ScriptedRuntime(), FakeCloudLink(truth), DecodeOptions(max_new_tokens=N, threshold=0.5))
    link = FakeCloudLink(truth, evict_at=[3, 9], evict_to=2)
    tokens, sources, _ = await decode(ScriptedRuntime(), link, DecodeOptions(max_new_tokens=N, threshold=0.5))
    assert tokens == baseline and sources == [CLOUD] * N
    calls = link.extend_calls()
    assert (calls[2].start, calls[3].start) == (P + 1, 2)  # refused at P+1, re-uploaded from position 2
    assert calls[3].rows == P + 2 - 2  # ... up to the escalated position


async def test_an_unreachable_cloud_means_fallback_tokens_then_collaboration_resumes() -> None:
    truth = truth_agreeing_except(set(range(100)))
    link = FakeCloudLink(truth)

    def weather(n: int) -> None:  # down after the 3rd token, back after the 8th
        link.down = 3 <= n < 8

    tokens, sources, stats = await decode(ScriptedRuntime(), link, DecodeOptions(max_new_tokens=N, threshold=0.5), on_token=weather)
    assert sources == [CLOUD] * 3 + [FALLBACK] * 5 + [CLOUD] * (N - 8)
    assert stats.fallback_tokens == 5
    seq = list(PROMPT)
    for token, source in zip(tokens, sources):
        assert token == (truth(seq) if source == CLOUD else edge_guess(seq))
        seq.append(token)
    resumed = [c for c in link.extend_calls() if c.start + c.rows == P + 8][0]
    assert resumed.start == P + 2 and resumed.rows == 6  # the fallback tokens' states went up with the next escalation
    assert link.calls[-1].kind == "close"


async def test_lossless_without_a_cloud_still_completes_marked_fallback() -> None:
    link = FakeCloudLink()
    link.down = True
    tokens, sources, _ = await decode(ScriptedRuntime(), link, DecodeOptions(max_new_tokens=N, threshold=0.5, lossless=True), lambda lg, h: 1.0)
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
        await decode(ScriptedRuntime(), link, DecodeOptions(max_new_tokens=N, threshold=0.5))
    assert err.value.code == ("unauthorized" if when == "open" else "forbidden")


async def test_generation_stops_at_a_stop_id_and_sends_nothing_after() -> None:
    full = greedy(edge_guess, PROMPT, N)
    stop = full[5]
    link = FakeCloudLink()
    tokens, _, _ = await decode(ScriptedRuntime(), link, DecodeOptions(max_new_tokens=N, threshold=0.5, stop_ids=[stop]))
    assert tokens == full[: full.index(stop) + 1]
    assert len(link.extend_calls()) == len(tokens) and link.calls[-1].kind == "close"
