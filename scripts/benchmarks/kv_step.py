"""The cloud's batched decode step at long context: N sessions with P positions of deep KV each, one new row each.

This is the step that preallocated KV (written in place at explicit positions) and ragged batching exist for: the
padded engine it replaced re-padded every session's whole past into one tensor and concatenated new KV on every
step. Run it against any checkout's engine to compare (the engine API is the same):

    OMP_NUM_THREADS=1 .venv/bin/offramp bench kv-step --sessions 16 --context 512
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

from offramp.cloud.context import ContextManager
from offramp.cloud.engine import DeepEngine
from offramp.models import load_model
from offramp.models.split import CloudPart

try:
    from offramp.shared.contract import ExtendRequest
except ImportError:  # an older checkout kept the request type in the engine
    from offramp.cloud.engine import ExtendRequest  # type: ignore[no-redef]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="offramp bench kv-step", description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--exit-layer", type=int, default=15)
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--context", type=int, default=512, help="positions each session holds before the timed steps")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model)
    engine = DeepEngine(CloudPart(model, args.exit_layer), ContextManager())
    hidden_size = model.config.hidden_size
    rng = np.random.default_rng(0)
    names = [f"s{i}" for i in range(args.sessions)]
    for name in names:  # layer-K-like rows: random, at the scale of real states
        engine.contexts.open(name)
        engine.extend(ExtendRequest(name, 0, (rng.standard_normal((args.context, hidden_size)) * 0.5).astype(np.float32)))
    times, length = [], args.context
    for _ in range(args.steps + 2):
        reqs = [ExtendRequest(name, length, (rng.standard_normal((1, hidden_size)) * 0.5).astype(np.float32)) for name in names]
        t0 = time.perf_counter()
        out = engine.extend_batch(reqs)
        times.append(time.perf_counter() - t0)
        assert all(not isinstance(r, Exception) and r.length == length + 1 for r in out), out[:2]
        length += 1
    steady = times[2:]
    print(json.dumps({"sessions": args.sessions, "context": args.context, "threads": args.threads, "steps": args.steps,
                      "step_ms_median": round(1000 * statistics.median(steady), 2),
                      "step_ms_min": round(1000 * min(steady), 2), "per_session_ms": round(1000 * statistics.median(steady) / args.sessions, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
