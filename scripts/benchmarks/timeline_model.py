"""A timeline model of the pipelined lossless loop: edge steps, uploads, the cloud's queue, round trips, rejections.

An event simulation of what `offramp.edge.decode_loop` does, with the costs as parameters: the edge's step time,
the cloud's time per request (fixed + per row), the link's one-way latency and upload bandwidth, and the chance
that a draft equals the full model's token (per position, drawn independently). It predicts the latency of a
collaborative generation and of the cloud-only one (the whole model in the cloud, tokens streamed), hence their
ratio, tokens per round trip and the cloud's share of the compute. `fit` tunes nothing: every parameter is a
measured quantity; the bench compares the model's prediction with its measured points.

    .venv/bin/offramp bench timeline --edge-ms 9 --cloud-fixed-ms 6 --cloud-row-ms 1.2 --full-ms 45 --rtt-ms 60 --alpha 0.55
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class Costs:
    edge_step_s: float  # one edge decode step (layers 0..K-1 + head)
    edge_prefill_s: float  # edge prefill, per prompt token
    cloud_fixed_s: float  # per request: frame handling, the LM-head-free part of a forward that does not scale
    cloud_row_s: float  # per row of a request
    full_step_s: float  # cloud-only: one decode step of the whole model
    full_prefill_s: float  # cloud-only: prefill, per prompt token
    cloud_prefill_row_s: float = 0.0  # deep layers, per prompt row (default: cloud_row_s)


@dataclass(frozen=True)
class Link:
    rtt_s: float
    up_bytes_per_s: float = 20e6 / 8
    row_bytes: float = 600.0  # payload + framing per uploaded row


@dataclass(frozen=True)
class Policy:
    max_depth: int = 8  # drafts ahead of the last final token
    block_rows: int = 4  # rows per verification request once one is in flight
    max_inflight: int = 3


@dataclass
class Timeline:
    latency_s: float
    ttft_s: float
    tokens: int
    round_trips: int = 0
    cloud_rows: int = 0  # rows the cloud ran (rejected drafts included; stale requests cost none)
    rejected: int = 0
    stale: int = 0
    edge_steps: int = 0

    @property
    def tokens_per_round_trip(self) -> float:
        return self.tokens / max(self.round_trips, 1)


@dataclass(order=True)
class _Event:
    time: float
    seq: int
    kind: str = field(compare=False)
    data: dict = field(compare=False, default_factory=dict)


def cloud_only(prompt: int, new: int, costs: Costs, link: Link) -> Timeline:
    """The baseline: the prompt goes up, the cloud prefills, then streams one token per full-model step."""
    one_way = link.rtt_s / 2
    first = one_way + prompt * costs.full_prefill_s + one_way
    return Timeline(first + (new - 1) * costs.full_step_s, first, new, round_trips=1, cloud_rows=prompt + new - 1)


def collaborative(prompt: int, new: int, costs: Costs, link: Link, alpha: float, policy: Policy, seed: int = 0) -> Timeline:
    """Simulate one pipelined lossless generation; drafts are right with probability `alpha` each."""
    rng = random.Random(seed)
    one_way = link.rtt_s / 2
    end = prompt + new  # positions 0..end-1 exist when done
    events: list[_Event] = []
    seq = iter(range(1 << 62))

    def push(t: float, kind: str, **data) -> None:
        heapq.heappush(events, _Event(t, next(seq), kind, data))

    # edge state
    final = prompt  # positions < final are decided
    rows = prompt  # rows the edge has computed (after prefill)
    drafted = prompt + 1  # positions < drafted have a token (the last ones are drafts)
    bad: int | None = None if rng.random() < alpha else prompt  # first wrong draft on the current path
    sent = 0
    epoch = 0
    inflight = 0
    busy_until = prompt * costs.edge_prefill_s
    stepping = False
    # cloud state
    cloud_free = 0.0
    cloud_epoch = 0
    last_arrival = 0.0
    tl = Timeline(0.0, 0.0, new)
    first_token_at: float | None = None

    def send(now: float) -> None:
        nonlocal sent, inflight, cloud_free, cloud_epoch, last_arrival
        s, e = sent, rows
        upload = (e - s) * link.row_bytes / link.up_bytes_per_s
        arrival = max(last_arrival, now + one_way + upload)
        last_arrival = arrival
        start = max(arrival, cloud_free)
        if epoch < cloud_epoch:  # pipelined behind a rejection the edge has not heard of yet
            tl.stale += 1
            done, verdict = start + 0.0002, ("stale", None)
        else:
            rowcost = costs.cloud_prefill_row_s or costs.cloud_row_s if s == 0 else costs.cloud_row_s
            done = start + costs.cloud_fixed_s + (e - s) * rowcost
            tl.cloud_rows += e - s
            lo, hi = max(s + 1, final), e  # positions this request verifies
            if bad is not None and lo <= bad <= hi:
                verdict = ("reject", bad)
                cloud_epoch += 1
            else:
                verdict = ("accept", hi)
        cloud_free = done
        sent = e
        inflight += 1
        tl.round_trips += 1
        push(done + one_way, "reply", epoch=epoch, verdict=verdict)

    def can_step() -> bool:
        """Run the newest token (a draft or the cloud's replacement) while few enough drafts are unconfirmed; the
        last position needs no row (its token is verified by the row before it)."""
        return not stepping and drafted - final < policy.max_depth and rows < end - 1

    def maybe_send(now: float) -> None:
        if sent >= rows:
            return
        unsent = rows - sent
        if inflight == 0:  # an idle link: send what there is at once
            send(now)
        elif inflight < policy.max_inflight and unsent >= policy.block_rows:
            send(now)
        elif not can_step() and not stepping:  # speculation stopped: nothing more will come, send what is there
            send(now)

    def step(now: float) -> None:
        nonlocal stepping, busy_until
        stepping = True
        busy_until = max(now, busy_until) + costs.edge_step_s
        tl.edge_steps += 1
        push(busy_until, "step", epoch=epoch, position=rows)

    # the prompt's rows go up as soon as the edge has them (one request), with the first draft
    push(busy_until, "prefilled")
    while events:
        ev = heapq.heappop(events)
        now = ev.time
        if ev.kind == "prefilled":
            send(now)
        elif ev.kind == "step":
            stepping = False
            if ev.data["epoch"] == epoch and ev.data["position"] == rows:  # still on the current path
                rows += 1
                if drafted == rows and drafted < end:
                    if bad is None and rng.random() >= alpha:
                        bad = drafted
                    drafted += 1
        elif ev.kind == "reply":
            inflight -= 1
            kind, at = ev.data["verdict"]
            if kind == "accept" and ev.data["epoch"] == epoch:
                final = max(final, at + 1)
            elif kind == "reject" and ev.data["epoch"] == epoch:
                tl.rejected += 1
                final = at + 1  # the cloud's token at `at` is final
                epoch += 1
                rows = min(rows, at)  # rows from `at` on belong to the wrong path; the replacement is run next
                drafted = at + 1
                sent = min(sent, at)
                bad = None
            if first_token_at is None and final > prompt:
                first_token_at = now
            if final >= end:
                tl.latency_s, tl.ttft_s = now, first_token_at or now
                return tl
        if not stepping and can_step():
            step(max(now, busy_until))
        maybe_send(now)
    raise RuntimeError("the simulation stalled")  # a policy that never sends


def fit(points: list[dict], costs: Costs, link: Link, policy: Policy) -> list[dict]:
    """Predictions beside measured points (each: prompt, new, alpha, measured latency ratio)."""
    out = []
    for pt in points:
        base = cloud_only(pt["prompt"], pt["new"], costs, link)
        runs = [collaborative(pt["prompt"], pt["new"], costs, link, pt["alpha"], policy, seed) for seed in range(20)]
        lat = sum(r.latency_s for r in runs) / len(runs)
        out.append(pt | {"predicted_ratio": lat / base.latency_s})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="offramp bench timeline", description=__doc__.splitlines()[0])
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--new", type=int, default=48)
    ap.add_argument("--edge-ms", type=float, default=9.0)
    ap.add_argument("--edge-prefill-ms", type=float, default=1.5)
    ap.add_argument("--cloud-fixed-ms", type=float, default=6.0)
    ap.add_argument("--cloud-row-ms", type=float, default=1.0)
    ap.add_argument("--full-ms", type=float, default=45.0)
    ap.add_argument("--full-prefill-ms", type=float, default=3.0)
    ap.add_argument("--rtt-ms", type=float, default=60.0)
    ap.add_argument("--alpha", type=float, nargs="+", default=[0.5])
    ap.add_argument("--depth", type=int, nargs="+", default=[8])
    ap.add_argument("--block", type=int, nargs="+", default=[4])
    ap.add_argument("--inflight", type=int, nargs="+", default=[3])
    ap.add_argument("--seeds", type=int, default=30)
    args = ap.parse_args(argv)
    costs = Costs(args.edge_ms / 1e3, args.edge_prefill_ms / 1e3, args.cloud_fixed_ms / 1e3, args.cloud_row_ms / 1e3,
                  args.full_ms / 1e3, args.full_prefill_ms / 1e3)
    link = Link(args.rtt_ms / 1e3)
    base = cloud_only(args.prompt, args.new, costs, link)
    for alpha in args.alpha:
        for depth in args.depth:
            for block in args.block:
                for inflight in args.inflight:
                    policy = Policy(depth, block, inflight)
                    runs = [collaborative(args.prompt, args.new, costs, link, alpha, policy, s) for s in range(args.seeds)]
                    mean = lambda f: sum(f(r) for r in runs) / len(runs)  # noqa: E731
                    print(json.dumps({"alpha": alpha, **asdict(policy), "latency_ratio": round(mean(lambda r: r.latency_s) / base.latency_s, 3),
                                      "ttft_ratio": round(mean(lambda r: r.ttft_s) / base.ttft_s, 3),
                                      "tokens_per_round_trip": round(mean(lambda r: r.tokens_per_round_trip), 2),
                                      "cloud_rows_per_token": round(mean(lambda r: r.cloud_rows) / args.new, 2),
                                      "stale": round(mean(lambda r: r.stale), 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
