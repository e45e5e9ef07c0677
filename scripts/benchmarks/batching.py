"""Deep-layer throughput: N sessions escalating together, one forward per session vs one batched forward.

Each session gets a real prompt of 20..60 tokens; the edge part of the model (layers 0..K-1) computes the
layer-K states, so the deep layers see what they see in service. After the prompt's catch-up, every session
escalates one token per step, greedily. Two engines decode side by side, interleaved step by step so load from
other work on the machine hits both alike: one runs `engine.extend` per session, the other one
`engine.extend_batch` over all sessions. Only the deep-layer calls are timed; the tokens must be identical.

    OMP_NUM_THREADS=2 .venv/bin/offramp bench batching --sessions 1 4 16 32 --steps 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from offramp.cloud.context import ContextManager
from offramp.cloud.engine import DeepEngine
from offramp.shared.contract import DeepResult, ExtendRequest
from offramp.models import load_model
from offramp.models.decoder import KV
from offramp.models.split import CloudPart, EdgePart

TEXT = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg combined movable "
    "metal type, oil-based ink and a wooden screw press into a system that could produce books far faster than any "
    "scribe. Within fifty years presses were running in more than two hundred European cities, and the price of a "
    "book fell so far that ordinary merchants could own a small library. Historians still argue about how much of "
    "the Reformation, the scientific revolution and the rise of vernacular literature followed from this change. "
    "Photosynthesis, by contrast, is far older: plants, algae and some bacteria capture light with chlorophyll and "
    "use its energy to turn water and carbon dioxide into sugars, releasing oxygen as a by-product. "
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n"
)


@dataclass
class Mode:
    """One engine decoding every session, with each session's edge KV and next layer-K rows."""

    batched: bool
    engine: DeepEngine
    pending: list[np.ndarray]
    edge_kv: list[list[KV]]
    starts: list[int]
    tokens: list[list[int]] = field(default_factory=list)
    prefill_s: float = 0.0
    decode_s: float = 0.0

    def step(self, timed_as: str) -> list[DeepResult]:
        reqs = [ExtendRequest(f"s{s}", self.starts[s], self.pending[s]) for s in range(len(self.pending))]
        t0 = time.perf_counter()
        results = self.engine.extend_batch(reqs) if self.batched else [self.engine.extend(r) for r in reqs]
        seconds = time.perf_counter() - t0
        if timed_as == "prefill":
            self.prefill_s += seconds
        else:
            self.decode_s += seconds
        for result in results:
            assert isinstance(result, DeepResult), result
        return results


def edge_rows(edge: EdgePart, ids: list[int], start: int, past: list[KV] | None) -> tuple[np.ndarray, list[KV]]:
    out = edge(torch.tensor([ids]), torch.arange(start, start + len(ids))[None], past)
    return out.hidden[0].numpy(), out.present


def prompts_for(tokenizer, n: int) -> list[list[int]]:
    """n prompts of 20..60 tokens, evenly spread, each from its own offset of the passage."""
    ids = tokenizer(TEXT)["input_ids"]
    lengths = [20 + (40 * s) // max(n - 1, 1) for s in range(n)]
    return [ids[(7 * s) % (len(ids) - 60):][:length] for s, length in enumerate(lengths)]


@torch.inference_mode()
def measure(model, k: int, prompts: list[list[int]], steps: int) -> dict:
    """Prompt catch-up, then `steps` escalations per session, for both engines interleaved."""
    edge = EdgePart(model, k)
    cloud = CloudPart(model, k)
    first = [edge_rows(edge, ids, 0, None) for ids in prompts]
    modes = [
        Mode(batched, DeepEngine(cloud, ContextManager()), [h for h, _ in first], [kv for _, kv in first],
             [0] * len(prompts), [[] for _ in prompts])
        for batched in (False, True)
    ]
    for step in range(steps + 1):
        for mode in modes:
            results = mode.step("prefill" if step == 0 else "decode")
            for s, result in enumerate(results):
                mode.tokens[s].append(int(result.token))
                mode.starts[s] = result.length
                if step < steps:
                    mode.pending[s], mode.edge_kv[s] = edge_rows(edge, [result.token], result.length, mode.edge_kv[s])
    one, bat = modes
    prefill_positions = sum(len(p) for p in prompts)
    decode_positions = len(prompts) * steps
    deep_layers = cloud.num_layers
    differing = sum(a != b for x, y in zip(one.tokens, bat.tokens) for a, b in zip(x, y))
    assert one.engine.layer_tokens == bat.engine.layer_tokens == (prefill_positions + decode_positions) * deep_layers
    return {
        "sessions": len(prompts),
        "prompt_tokens": [len(p) for p in prompts],
        "decode_positions": decode_positions,
        "one_by_one_tok_s": decode_positions / one.decode_s,
        "batched_tok_s": decode_positions / bat.decode_s,
        "speedup": one.decode_s / bat.decode_s,
        "prefill_one_by_one_tok_s": prefill_positions / one.prefill_s,
        "prefill_batched_tok_s": prefill_positions / bat.prefill_s,
        "prefill_speedup": one.prefill_s / bat.prefill_s,
        "identical_tokens": differing == 0,
        "differing_tokens": differing,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="offramp bench batching", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--exit-layer", type=int, default=15)
    ap.add_argument("--sessions", type=int, nargs="+", default=[16])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--json", action="store_true", help="one JSON object on stdout instead of the table")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model)
    deep_layers = model.config.num_hidden_layers - args.exit_layer
    if not args.json:
        print(f"K={args.exit_layer} ({deep_layers} deep layers), {args.steps} decode steps, {torch.get_num_threads()} threads; "
              "deep-layer tokens/s over the decode steps (each token runs every deep layer)")
        print(f"{'sessions':>8} {'one-by-one tok/s':>17} {'batched tok/s':>14} {'ratio':>6} {'prefill ratio':>14} {'identical':>10}")
    rows = []
    for n in args.sessions:
        r = measure(model, args.exit_layer, prompts_for(tokenizer, n), args.steps)
        rows.append(r)
        if not args.json:
            print(f"{n:>8} {r['one_by_one_tok_s']:>17.1f} {r['batched_tok_s']:>14.1f} {r['speedup']:>5.2f}x "
                  f"{r['prefill_speedup']:>13.2f}x {str(r['identical_tokens']):>10}", flush=True)
    if args.json:
        meta = {"model": args.model, "exit_layer": args.exit_layer, "deep_layers": deep_layers, "steps": args.steps,
                "threads": torch.get_num_threads()}
        print(json.dumps({"meta": meta, "rows": rows}))
    return 0 if all(r["identical_tokens"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
