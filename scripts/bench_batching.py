"""Deep-layer throughput: N sessions escalating together, one forward per session vs one batched forward.

Both engines get the same layer-K states of real prompts (the edge part of the default model computes them) and
decode greedily step by step, each session escalating every token; tokens must come out identical. Measured
side by side in one run on this machine; the ratio is what batching buys.

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_batching.py --sessions 1 4 16 32 --steps 24
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np
import torch

from offramp.cloud.context import ContextManager
from offramp.cloud.engine import DeepEngine, ExtendRequest
from offramp.models import load_model
from offramp.models.split import CloudPart, EdgePart


def edge_states(edge: EdgePart, ids: list[int], start: int, past):
    out = edge(torch.tensor([ids]), torch.arange(start, start + len(ids))[None], past)
    return out.hidden[0].numpy(), out.present


@torch.inference_mode()
def run(model, k: int, prompts: list[list[int]], steps: int, batched: bool) -> tuple[list[list[int]], float, int]:
    """Greedy decoding of every prompt; returns tokens, seconds spent in the deep layers, positions run."""
    edge = EdgePart(model, k)
    engine = DeepEngine(CloudPart(model, k), ContextManager())
    n = len(prompts)
    tokens: list[list[int]] = [[] for _ in range(n)]
    pasts = [None] * n
    starts = [0] * n
    pending = []
    for s, ids in enumerate(prompts):
        hidden, pasts[s] = edge_states(edge, ids, 0, None)
        pending.append(hidden)
    deep_s, positions = 0.0, 0
    for _ in range(steps):
        reqs = [ExtendRequest(f"s{s}", starts[s], pending[s]) for s in range(n)]
        t0 = time.perf_counter()
        results = engine.extend_batch(reqs) if batched else [engine.extend(r) for r in reqs]
        deep_s += time.perf_counter() - t0
        positions += sum(len(r.hidden) for r in reqs)
        for s, result in enumerate(results):
            tokens[s].append(int(result.token))
            starts[s] = result.length
            pending[s], pasts[s] = edge_states(edge, [tokens[s][-1]], starts[s], pasts[s])
    return tokens, deep_s, positions


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--exit-layer", type=int, default=15)
    ap.add_argument("--sessions", type=int, nargs="+", default=[1, 4, 16, 32])
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    texts = ["The history of", "Write a haiku about the sea.", "def fibonacci(n):", "In 1905, Albert Einstein published",
             "The three primary colors are", "Explain photosynthesis to a child:", "Once upon a time in a small village,",
             "The quick brown fox"]
    rows = []
    for n in args.sessions:
        prompts = [tokenizer(texts[s % len(texts)] + " " * (s // len(texts)))["input_ids"] for s in range(n)]
        one_tokens, one_s, positions = run(model, args.exit_layer, prompts, args.steps, batched=False)
        bat_tokens, bat_s, _ = run(model, args.exit_layer, prompts, args.steps, batched=True)
        rows.append({
            "sessions": n, "positions": positions, "one_by_one_tok_s": positions / one_s, "batched_tok_s": positions / bat_s,
            "speedup": one_s / bat_s, "identical_tokens": one_tokens == bat_tokens,
            "differing_tokens": sum(a != b for x, y in zip(one_tokens, bat_tokens) for a, b in zip(x, y)),
        })
        if not args.json:
            r = rows[-1]
            print(f"{n:>3} sessions: one-by-one {r['one_by_one_tok_s']:8.1f} pos/s  batched {r['batched_tok_s']:8.1f} pos/s  "
                  f"x{r['speedup']:.2f}  identical tokens: {r['identical_tokens']}", flush=True)
    meta = {"exit_layer": args.exit_layer, "steps": args.steps, "threads": torch.get_num_threads(), "deep_layers": model.config.num_hidden_layers - args.exit_layer}
    if args.json:
        print(json.dumps({"meta": meta, "rows": rows}))
    return 0 if all(r["identical_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
