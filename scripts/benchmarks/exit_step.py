"""Edge time per token with several exits (`--exit-layers 8 15`) against one (`15`), at forced early-exit rates.

    .venv/bin/offramp bench exit-step [--model default] [--exit-layers 8 15] [--precision q4] [--rates 0 0.25 0.5 0.75 1]
        [--context 128] [--tokens 32] [--rounds 6] [--threads 1] [--json FILE]

Both edges are the exported ONNX graphs with the untrained final-norm head at every exit (norm + the tied LM head:
what a head costs, its quality aside, since the rate is forced). For each rate r the multi-exit runtime's gate
leaves at the early exit with probability r (a seeded draw per step). A window of `--tokens` single-token steps
from a `--context`-token prefill is timed, the skipped layers' KV filled batched with the next step that goes
to K as the runtime does, plus one `fill()` at the end so every position is complete (a collaborating edge
fills them all); then the window is rolled back. Runtimes are timed in interleaved rounds, so machine load hits
them alike; the medians over rounds are reported as ms per token.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


class ForcedGate:
    """Exits when a seeded draw says so (rate r), whatever the logits: the gate of `MultiExitRuntime`."""

    def __init__(self, rate: float, seed: int = 0) -> None:
        self.rate, self.rng = rate, np.random.default_rng(seed)
        self.threshold = 0.5

    def confidence(self, logits: np.ndarray, hidden: np.ndarray) -> float:
        return float(self.rng.random() < self.rate)


def window_ms(runtime, context: int, tokens: list[int]) -> float:
    """ms per token of `tokens` single-token steps (plus the fill of what is left pending), then roll back."""
    start = time.perf_counter()
    for token in tokens:
        runtime.run([token])
    runtime.fill()
    elapsed = time.perf_counter() - start
    runtime.truncate(context)
    return elapsed / len(tokens) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="offramp bench exit-step", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--exit-layers", type=int, nargs="+", default=[8, 15], help="the multi-exit edge (the last is K)")
    parser.add_argument("--precision", default="q4", help="graph precision (q4: what a collaborating edge runs)")
    parser.add_argument("--rates", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0], help="forced early-exit rates")
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=32, help="single-token steps per timed window")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (one window per runtime each)")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op threads")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from offramp.edge.multi_exit import ExitGate, open_edge_runtime
    from offramp.models import load_model
    from offramp.models.edge_dir import ensure_edge_graph
    from offramp.shared.exit_layers import check_exit_layers

    model, _ = load_model(args.model)
    *early, k = check_exit_layers(args.exit_layers, model.config.num_hidden_layers)
    if not early:
        parser.error("--exit-layers needs an early exit and K (e.g. 8 15)")
    single_dir = ensure_edge_graph(args.model, k, args.precision, model=model, progress=False)
    multi_dir = ensure_edge_graph(args.model, k, args.precision, model=model, progress=False, early_exits=early)
    rng = np.random.default_rng(0)
    context = rng.integers(0, model.config.vocab_size, args.context).tolist()
    window = rng.integers(0, model.config.vocab_size, args.tokens).tolist()
    runtimes = {f"exits {k}": open_edge_runtime(single_dir, intra_op_threads=args.threads)}
    for rate in args.rates:
        gates = [ForcedGate(rate, seed=i) for i in range(len(early))]
        name = f"exits {'/'.join(map(str, (*early, k)))} @ {rate:.2f}"
        runtimes[name] = open_edge_runtime(multi_dir, [ExitGate(g.confidence, g.threshold) for g in gates], intra_op_threads=args.threads)
    for runtime in runtimes.values():
        runtime.run(context)
        window_ms(runtime, args.context, window[:4])  # warm-up
    load_start = os.getloadavg()
    samples: dict[str, list[float]] = {name: [] for name in runtimes}
    for _ in range(args.rounds):
        for name, runtime in runtimes.items():
            samples[name].append(window_ms(runtime, args.context, window))
    load_end = os.getloadavg()
    base = float(np.median(samples[f"exits {k}"]))
    rows = []
    print(f"{args.model} {args.precision}, {args.threads} thread(s), context {args.context}, {args.tokens}-token windows x {args.rounds} rounds; "
          f"load average {load_start[0]:.2f} -> {load_end[0]:.2f}")
    print("edge | ms/token (median) | saved vs one exit")
    for name, values in samples.items():
        ms = float(np.median(values))
        rows.append({"edge": name, "ms_per_token": round(ms, 3), "saved_ms": round(base - ms, 3), "saved_frac": round(1 - ms / base, 3),
                     "rounds_ms": [round(v, 3) for v in values]})
        print(f"{name} | {ms:.2f} | {base - ms:+.2f} ms ({(1 - ms / base) * 100:+.0f}%)")
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "precision": args.precision, "threads": args.threads, "context": args.context,
                                         "tokens": args.tokens, "rounds": args.rounds, "load_average": [load_start[0], load_end[0]], "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
