"""A timeline model of the pipelined lossless loop: edge steps, uploads, the cloud's queue, round trips, rejections.

An event simulation of what `offramp.edge.decode_loop` does, with the costs as parameters: the edge's step time,
the cloud's time per request (fixed + per row), the link's one-way latency and upload bandwidth, and the chance
that a draft equals the full model's token (per position, drawn independently). It predicts the latency of a
collaborative generation and of the cloud-only one (the whole model in the cloud, tokens streamed), hence their
ratio, tokens per round trip and the cloud's share of the compute. It replaces the bench's old what-if model,
which assumed that each escalation blocks the edge.

    offramp bench timeline --edge-ms 9 --cloud-fixed-ms 6 --cloud-row-ms 1.2 --full-ms 45 --rtt-ms 60 --alpha 0.55
    offramp bench timeline --fit bench-results/<run>/results.json   # prediction beside each measured headline row
    offramp bench timeline --map                                    # where collaboration wins (README)

`--fit` tunes nothing: every parameter is measured in that run (see `costs_of_run`).
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
import random
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path


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


# The share of a deep-layer forward that grows with its rows; the rest is paid once per request (weights read once,
# frame handling). Measured here at K=15: one row ~32 ms, a block of 8 rows 73-77 ms (README "Performance"), so
# each extra row costs ~6 ms, ~0.2 of a one-row step. A GPU's few-row forwards are flatter still.
ROW_SHARE = 0.2


def deep_costs(deep_step_s: float) -> tuple[float, float]:
    """(fixed per request, per row) of a deep-layer forward whose one-row time is `deep_step_s`."""
    return deep_step_s * (1 - ROW_SHARE), deep_step_s * ROW_SHARE


def controller_depth(rtt_s: float, edge_step_s: float, max_draft: int = 16) -> int:
    """The depth `offramp.edge.decode_loop.DraftController` settles at with drafts that survive: a round trip's
    worth of edge steps, plus one."""
    return max(1, min(max_draft, math.ceil(rtt_s / max(edge_step_s, 1e-4)) + 1))


def predicted_ratio(prompt: int, new: int, costs: Costs, link: Link, alpha: float, seeds: int = 10) -> dict:
    """Mean latency, TTFT and tokens per round trip of the collaborative loop over `seeds` draws, against cloud-only."""
    policy = Policy(controller_depth(link.rtt_s, costs.edge_step_s), block_rows=2, max_inflight=2)  # DecodeOptions' defaults
    base = cloud_only(prompt, new, costs, link)
    runs = [collaborative(prompt, new, costs, link, alpha, policy, seed) for seed in range(seeds)]
    mean = lambda f: sum(f(r) for r in runs) / len(runs)  # noqa: E731
    return {"latency_ratio": mean(lambda r: r.latency_s) / base.latency_s, "ttft_ratio": mean(lambda r: r.ttft_s) / base.ttft_s,
            "tokens_per_round_trip": mean(lambda r: r.tokens_per_round_trip), "depth": policy.max_depth}


def costs_of_run(results: dict, profile: str, row: dict) -> tuple[Costs, Link, float, int, int]:
    """(costs, link, alpha, prompt tokens, new tokens) of one measured collaborative row of a bench run.

    Measured: the edge step (median), the cloud-only decode step and prefill (its row's TTFT and latency), the
    link's round trip (the profile's), the acceptance. Derived: a deep-layer forward of one row is the full step's
    share of the deep layers (N-K of N), split into a fixed and a per-row part by `ROW_SHARE`.
    """
    from offramp.bench.link_emulator import get_profile

    meta = results["meta"]
    n_layers, k = meta["num_layers"], row["exit_layer"]
    base = next(r for r in results[profile]["rows"] if r["mode"] == "cloud-only")
    new = max(round(row["tokens"] / max(row["requests"], 1)), 2)
    prompt = round(sum(p["tokens"] for p in meta["prompts"]) / max(len(meta["prompts"]), 1))
    link_profile = get_profile(profile)
    rtt = link_profile.up.latency_s + link_profile.down.latency_s
    base_new = max(base["tokens"] / max(base["requests"], 1), 2)
    full_step = max(base["latency_p50_s"] - base["ttft_p50_s"], 0.0) / (base_new - 1)
    full_prefill = max(base["ttft_p50_s"] - rtt, 0.0) / max(prompt, 1)
    edge_step = row.get("edge_step_p50_s") or 0.0
    fixed, row_s = deep_costs(full_step * (n_layers - k) / n_layers)
    costs = Costs(edge_step, edge_step / 8, fixed, row_s, full_step, full_prefill, full_prefill * (n_layers - k) / n_layers)
    checked = row.get("accepted_drafts", 0) + row.get("rejected_drafts", 0)  # per-draft acceptance, from the counts
    return costs, Link(rtt), row.get("accepted_drafts", 0) / checked if checked else 0.0, prompt, new


def fit_results(results: dict) -> list[dict]:
    """The model's prediction beside every measured headline row of a bench run (nothing is tuned to match)."""
    from offramp.bench.link_emulator import PROFILES

    out = []
    for profile in (p for p in results if p in PROFILES and isinstance(results[p], dict) and "headline_rows" in results[p]):
        rows = {r["key"]: r for r in results[profile]["rows"]}
        for h in results[profile]["headline_rows"]:
            row = rows[h["setting"]]
            if not row.get("lossless") or not row.get("edge_step_p50_s"):
                continue  # the model simulates the lossless loop
            costs, link, alpha, prompt, new = costs_of_run(results, profile, row)
            out.append({"profile": profile, "setting": h["setting"], "alpha": round(alpha, 3),
                        "measured_latency_ratio": h["latency_ratio"],
                        **{k: round(v, 3) for k, v in predicted_ratio(prompt, new, costs, link, alpha).items()}})
    return out


def win_map(edge_layer_ms: float, exit_layer: int, num_layers: int, speed_ratios: list[float], rtts_ms: list[float],
            alphas: list[float], prompt: int = 40, new: int = 48) -> str:
    """Markdown tables of the predicted latency ratio (collaborative / cloud-only) for each cloud speed-up per layer
    over the edge, round trip and acceptance: where the ratio is below 1, collaboration is faster."""
    lines = []
    for speed in speed_ratios:
        cloud_layer = edge_layer_ms / speed / 1e3
        fixed, row_s = deep_costs(cloud_layer * (num_layers - exit_layer))
        costs = Costs(edge_layer_ms * exit_layer / 1e3, edge_layer_ms * exit_layer / 8e3, fixed, row_s,
                      cloud_layer * num_layers, cloud_layer * num_layers / 8)
        lines += [f"Cloud {speed:g}x faster per layer than the edge (edge step {edge_layer_ms * exit_layer:.1f} ms at K={exit_layer}, "
                  f"cloud-only step {cloud_layer * num_layers * 1e3:.1f} ms):", "",
                  "| RTT \\ acceptance | " + " | ".join(f"{a:g}" for a in alphas) + " |",
                  "|---|" + "---|" * len(alphas)]
        for rtt in rtts_ms:
            cells = [predicted_ratio(prompt, new, costs, Link(rtt / 1e3), a)["latency_ratio"] for a in alphas]
            lines.append(f"| {rtt:g} ms | " + " | ".join(f"**{c:.2f}**" if c < 1 else f"{c:.2f}" for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


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
    ap.add_argument("--fit", type=Path, default=None, metavar="RESULTS_JSON", help="predict every lossless headline row of a bench run beside its measurement")
    ap.add_argument("--map", action="store_true", help="markdown tables: predicted latency ratio by cloud speed-up, RTT and acceptance")
    ap.add_argument("--edge-layer-ms", type=float, default=1.1, help="--map: edge time per layer (q4 graph, one thread, here: ~1.1 ms)")
    ap.add_argument("--exit-layer", type=int, default=15)
    ap.add_argument("--num-layers", type=int, default=30)
    ap.add_argument("--speed", type=float, nargs="+", default=[1.0, 3.0, 10.0], help="--map: cloud speed-ups per layer over the edge")
    ap.add_argument("--rtts-ms", type=float, nargs="+", default=[10.0, 30.0, 60.0, 120.0, 250.0])
    args = ap.parse_args(argv)
    if args.fit is not None:
        for line in fit_results(json.loads(args.fit.read_text())):
            print(json.dumps(line))
        return 0
    if args.map:
        alphas = args.alpha if args.alpha != [0.5] else [0.3, 0.5, 0.7, 0.9]
        print(win_map(args.edge_layer_ms, args.exit_layer, args.num_layers, args.speed, args.rtts_ms, alphas, args.prompt, args.new))
        return 0
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
