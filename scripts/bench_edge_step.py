"""Edge decode-step latency: ORT int8 vs ORT fp32 vs PyTorch fp32 at K=10 and K=15, with the bandwidth floor.

    .venv/bin/python scripts/bench_edge_step.py [--exit-layers 10 15] [--context 128] [--steps 100] [--json FILE]

Each runtime is prefilled with `--context` positions, then timed over single-token steps (median after warm-up),
truncating back to the context after every step so all steps see the same cache length. The floor is the weight
bytes one step must read divided by this machine's memory bandwidth (measured with a large numpy copy).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def memory_bandwidth_gbs(size_mb: int = 512, repeats: int = 5) -> float:
    """Copy bandwidth (read + write bytes per second), best of `repeats`, in GB/s."""
    src = np.ones(size_mb * 2**20 // 8, dtype=np.float64)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - start)
    return 2 * src.nbytes / best / 1e9


def step_bytes(model, exit_layer: int, precision: str, graph_bytes: int | None) -> int:
    """Weight bytes a decode step reads: K layers + LM head + final norm (one embedding row is negligible)."""
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    params = exit_layer * per_layer + model.lm_head.weight.numel() + model.model.norm.weight.numel()
    return params * (4 if precision == "fp32" else 1)


def time_steps(runtime, context_ids: list[int], steps: int, warmup: int = 10) -> float:
    """Median ms of one single-token step at a fixed cache length."""
    runtime.reset()
    runtime.run(context_ids)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        runtime.run([context_ids[i % len(context_ids)]])
        elapsed = time.perf_counter() - start
        runtime.truncate(len(context_ids))
        if i >= warmup:
            times.append(elapsed)
    return float(np.median(times) * 1e3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--exit-layers", type=int, nargs="+", default=[10, 15])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op and torch threads (default: all usable CPUs)")
    parser.add_argument("--out", type=Path, default=None, help="where to export graphs (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    from offramp.edge.onnx_runtime import OnnxEdgeRuntime, default_threads
    from offramp.models.edge_dir import ensure_edge_graph
    from offramp.models.reference_runtime import TorchEdgeRuntime
    from offramp.models import load_model
    from offramp.shared.edge_manifest import GRAPH_FILE
    from offramp.models.split import EdgePart

    threads = args.threads or default_threads()
    torch.set_num_threads(threads)
    model, _ = load_model(args.model)
    context = np.random.default_rng(0).integers(0, model.config.vocab_size, args.context).tolist()
    bandwidth = memory_bandwidth_gbs()
    out_root = args.out or Path(tempfile.mkdtemp(prefix="offramp-bench-"))
    rows = []
    for k in args.exit_layers:
        for name, precision in (("ort-int8", "int8"), ("ort-fp32", "fp32"), ("torch-fp32", None)):
            if precision is None:
                runtime, size = TorchEdgeRuntime(EdgePart(model, k)), None
            else:
                graph_dir = ensure_edge_graph(args.model, k, precision, out_dir=out_root / f"k{k}-{precision}", model=model)
                runtime, size = OnnxEdgeRuntime(graph_dir, intra_op_threads=threads), (graph_dir / GRAPH_FILE).stat().st_size
            ms = time_steps(runtime, context, args.steps)
            weight_bytes = step_bytes(model, k, precision or "fp32", size)
            rows.append({
                "exit_layer": k, "runtime": name, "median_ms": round(ms, 3), "artifact_mb": None if size is None else round(size / 1e6, 1),
                "step_weight_mb": round(weight_bytes / 1e6, 1), "floor_ms": round(weight_bytes / (bandwidth * 1e9) * 1e3, 3),
            })
            del runtime
    print(f"memory bandwidth (numpy copy): {bandwidth:.1f} GB/s; threads {threads}; context {args.context}; {args.steps} steps")
    print(f"{'K':>3} {'runtime':<11} {'median ms':>10} {'artifact MB':>12} {'weights/step MB':>16} {'floor ms':>9}")
    for r in rows:
        print(f"{r['exit_layer']:>3} {r['runtime']:<11} {r['median_ms']:>10.2f} {r['artifact_mb'] or '-':>12} {r['step_weight_mb']:>16} {r['floor_ms']:>9.2f}")
    if args.json:
        args.json.write_text(json.dumps({"bandwidth_gbs": bandwidth, "threads": threads, "context": args.context, "steps": args.steps, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
