"""Edge decode-step latency (and, with --accuracy, teacher-forced fidelity) of the edge graph precisions.

    .venv/bin/offramp bench edge-step [--exit-layers 10 15] [--context 128] [--steps 100] [--threads 1]
        [--precisions fp32 int8 q4] [--candidates] [--accuracy] [--llama-cpp auto|on|off] [--json FILE] [--out DIR]

Every runtime of one exit layer is prefilled with `--context` random tokens, then all are timed in interleaved
rounds of single-token steps (each step rolled back, so every step sees the same cache length): machine load
then hits them alike, and the medians compare. `--candidates` adds the recipes the shipped ones were chosen from
(offramp.models.quantize.CANDIDATES); `--accuracy` measures each graph's teacher-forced agreement on held-out
text (offramp.models.edge_fidelity: minutes per graph). The floor is the weight bytes one step must read over
this machine's memory bandwidth (a large numpy copy).

The peer a user would otherwise pick for an edge runtime, llama.cpp, runs the whole model from the same GGUF
(and a Q8_0 copy of it) when `llama_cpp` (llama-cpp-python) is importable: never a dependency of offramp. Its
rows have exit_layer = the model's layer count; `ms_per_layer` is a step over the layers it runs (head included,
as for ours).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

LLAMA_CPP_TYPES = {"Q4_1": None, "Q8_0": 7}  # None: the GGUF as shipped; else llama_ftype to requantize to


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


def step_weight_bytes(graph_file: Path) -> int:
    """Initializer bytes a decode step reads: all but tables only gathered from (one row a step)."""
    import onnx

    model = onnx.load(str(graph_file))
    gathered = {n.input[0] for n in model.graph.node if n.op_type in ("Gather", "GatherBlockQuantized")}
    gathered |= {n.input[2] for n in model.graph.node if n.op_type == "GatherBlockQuantized"}
    other = {i for n in model.graph.node if n.op_type not in ("Gather", "GatherBlockQuantized") for i in n.input}
    return sum(len(i.raw_data) for i in model.graph.initializer if not (i.name in gathered and i.name not in other))


@dataclass
class Stepper:
    """Something timed step by step at a fixed cache length."""

    name: str
    prefill: Callable[[list[int]], None]
    step: Callable[[int], None]
    rollback: Callable[[int], None]


def runtime_stepper(name: str, runtime) -> Stepper:
    def prefill(ids: list[int]) -> None:
        runtime.reset()
        runtime.run(ids)

    return Stepper(name, prefill, lambda token: runtime.run([token]), runtime.truncate)


def llama_cpp_stepper(name: str, gguf: Path, threads: int, context: int) -> Stepper:
    """llama.cpp through llama-cpp-python: eval one token, then drop it from the KV cache again.

    Loaded without ggml's extra CPU buffer types (AMX, repacked weights): on this machine the AMX int8 matmul
    of llama-cpp-python 0.3.36 segfaults in the first decode; without them Q4_1 runs at the 18-19 ms a token
    measured before with llama.cpp.
    """
    import llama_cpp
    import llama_cpp.llama as llama_module

    default_params = llama_cpp.llama_model_default_params

    def params_without_extra_buffers():
        params = default_params()
        params.use_extra_bufts = False
        return params

    llama_module.llama_cpp.llama_model_default_params = params_without_extra_buffers
    try:
        llm = llama_module.Llama(model_path=str(gguf), n_ctx=context + 64, n_threads=threads, n_threads_batch=threads, verbose=False)
    finally:
        llama_module.llama_cpp.llama_model_default_params = default_params

    def prefill(ids: list[int]) -> None:
        llm.reset()
        llm._ctx.kv_cache_clear()
        llm.eval(ids)

    def rollback(length: int) -> None:
        llm._ctx.kv_cache_seq_rm(-1, length, -1)
        llm.n_tokens = length

    return Stepper(name, prefill, lambda token: llm.eval([token]), rollback)


def llama_cpp_peers(args, out_root: Path, threads: int, context: int) -> list[tuple[Stepper, int]]:
    """(stepper, file bytes) for each llama.cpp type, or [] when llama_cpp is not importable / the model has no GGUF."""
    if args.llama_cpp == "off":
        return []
    try:
        import llama_cpp
    except ImportError:
        if args.llama_cpp == "on":
            raise
        print("llama.cpp peer: llama_cpp (llama-cpp-python) is not importable; skipped")
        return []
    from offramp.models.checkpoints import default_gguf_path

    gguf = Path(args.gguf) if args.gguf else (default_gguf_path() if args.model == "default" else None)
    if gguf is None:
        print("llama.cpp peer: no GGUF for this model (pass --gguf); skipped")
        return []
    peers = []
    for type_name, ftype in LLAMA_CPP_TYPES.items():
        path = gguf
        if ftype is not None:
            path = out_root / f"{gguf.stem}.{type_name}.gguf"
            if not path.is_file():
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype = ftype
                params.allow_requantize = True
                if llama_cpp.llama_model_quantize(str(gguf).encode(), str(path).encode(), params) != 0:
                    raise RuntimeError(f"llama.cpp could not requantize {gguf} to {type_name}")
        peers.append((llama_cpp_stepper(f"llama.cpp-{type_name}", path, threads, context), path.stat().st_size))
    return peers


def time_interleaved(steppers: list[Stepper], context: list[int], steps: int, rounds: int, warmup: int = 5) -> dict[str, float]:
    """Median ms of one step for each stepper, measured in `rounds` interleaved rounds of steps/rounds steps."""
    for s in steppers:
        s.prefill(context)
        for i in range(warmup):
            s.step(context[i])
            s.rollback(len(context))
    samples: dict[str, list[float]] = {s.name: [] for s in steppers}
    per_round = max(1, steps // rounds)
    for r in range(rounds):
        for s in steppers:
            for i in range(per_round):
                start = time.perf_counter()
                s.step(context[(r * per_round + i) % len(context)])
                samples[s.name].append(time.perf_counter() - start)
                s.rollback(len(context))
    return {name: float(np.median(t) * 1e3) for name, t in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="offramp bench edge-step", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--exit-layers", type=int, nargs="+", default=[10, 15])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per runtime and exit layer")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds the steps are spread over")
    parser.add_argument("--threads", type=int, default=1, help="ORT intra-op / torch / llama.cpp threads")
    parser.add_argument("--precisions", nargs="+", default=None, help="graph precisions (default: all of PRECISIONS)")
    parser.add_argument("--candidates", action="store_true", help="also the recipes the shipped ones were chosen from")
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch fp32 edge part")
    parser.add_argument("--accuracy", action="store_true", help="teacher-forced agreement on held-out text (slow)")
    parser.add_argument("--accuracy-prompts", type=int, default=None, help="held-out prompts (default: all 34)")
    parser.add_argument("--human-tokens", type=int, default=4800, help="held-out human-text tokens")
    parser.add_argument("--llama-cpp", choices=("auto", "on", "off"), default="auto")
    parser.add_argument("--gguf", default=None, help="GGUF for the llama.cpp peer (default: the default model's)")
    parser.add_argument("--out", type=Path, default=None, help="where to export graphs (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    from offramp.edge.onnx_runtime import OnnxEdgeRuntime
    from offramp.models.edge_dir import ensure_edge_graph
    from offramp.models.reference_runtime import TorchEdgeRuntime
    from offramp.models import load_model
    from offramp.models.quantize import CANDIDATES, RECIPES, quantize_edge_dir
    from offramp.models.split import EdgePart
    from offramp.shared.edge_manifest import GRAPH_FILE, PRECISIONS, read_manifest

    threads = args.threads
    torch.set_num_threads(threads)
    model, tok = load_model(args.model)
    num_layers = model.config.num_hidden_layers
    context = np.random.default_rng(0).integers(0, model.config.vocab_size, args.context).tolist()
    bandwidth = memory_bandwidth_gbs()
    out_root = args.out or Path(tempfile.mkdtemp(prefix="offramp-bench-"))
    out_root.mkdir(parents=True, exist_ok=True)
    precisions = args.precisions or list(PRECISIONS)
    candidates = [c for c in CANDIDATES if c not in RECIPES] if args.candidates else []
    peers = llama_cpp_peers(args, out_root, threads, args.context)
    if args.accuracy:
        from offramp.models.edge_fidelity import heldout_sequences, measure, reference

        seqs = heldout_sequences(model, tok, args.accuracy_prompts, human_tokens=args.human_tokens)
    load_start = os.getloadavg()
    rows = []
    for k in args.exit_layers:
        graphs: dict[str, Path] = {}
        for p in precisions:
            graphs[f"ort-{p}"] = ensure_edge_graph(args.model, k, p, out_dir=out_root / f"k{k}-{p}", model=model, progress=False)
        for c in candidates:
            fp32_dir = ensure_edge_graph(args.model, k, "fp32", out_dir=out_root / f"k{k}-fp32", model=model, progress=False)
            graphs[f"ort-{c}"] = quantize_edge_dir(fp32_dir, out_root / f"k{k}-{c}", c)
        runtimes = {name: OnnxEdgeRuntime(d, intra_op_threads=threads) for name, d in graphs.items()}
        if not args.no_torch:
            runtimes["torch-fp32"] = TorchEdgeRuntime(EdgePart(model, k))
        steppers = [runtime_stepper(n, r) for n, r in runtimes.items()] + [s for s, _ in peers]
        ms = time_interleaved(steppers, context, args.steps, args.rounds)
        fp32_ms = ms.get("ort-fp32")
        fidelity = {}
        if args.accuracy:
            ref = reference(model, k, seqs)
            for name, runtime in runtimes.items():
                fidelity[name] = measure(runtime, model, seqs, ref).row()
                print(f"K={k} {name}: {fidelity[name]}", flush=True)
        for name, runtime in runtimes.items():
            graph = graphs.get(name)
            weights = step_weight_bytes(graph / GRAPH_FILE) if graph else 4 * (sum(p.numel() for p in runtime.edge.parameters()))
            recipe = (read_manifest(graph).get("quantization") or {}).get("recipe", "fp32") if graph else "torch"
            rows.append(_row(k, name, recipe, ms[name], fp32_ms, k, graph and (graph / GRAPH_FILE).stat().st_size, weights, bandwidth, fidelity.get(name)))
        for stepper, size in peers:
            rows.append(_row(num_layers, stepper.name, "gguf", ms[stepper.name], None, num_layers, size, size, bandwidth, None, measured_at=k))
        del runtimes, steppers
    load_end = os.getloadavg()
    print(f"memory bandwidth (numpy copy): {bandwidth:.1f} GB/s; threads {threads}; context {args.context}; "
          f"{args.steps} steps in {args.rounds} interleaved rounds; load average {load_start[0]:.2f} -> {load_end[0]:.2f}")
    keys = ["exit_layer", "runtime", "median_ms", "x_fp32", "ms_per_layer", "artifact_mb", "step_weight_mb", "floor_ms"]
    if args.accuracy:
        keys += ["agreement", "serving_agreement", "human_agreement", "exit_top1_vs_fp32", "hidden_rel_err"]
    print(" | ".join(keys))
    for r in rows:
        print(" | ".join("-" if r.get(key) is None else str(r[key]) for key in keys))
    if args.json:
        args.json.write_text(json.dumps({
            "bandwidth_gbs": bandwidth, "threads": threads, "context": args.context, "steps": args.steps, "rounds": args.rounds,
            "load_average": [load_start[0], load_end[0]], "rows": rows,
        }, indent=2))
    return 0


def _row(k, name, recipe, ms, fp32_ms, layers, size, weights, bandwidth, fidelity, measured_at=None) -> dict:
    """One uniform result row (the report prints the first row's keys as the header)."""
    row = {
        "exit_layer": k, "runtime": name, "recipe": recipe, "median_ms": round(ms, 3),
        "x_fp32": None if not fp32_ms else round(ms / fp32_ms, 3), "ms_per_layer": round(ms / layers, 3),
        "artifact_mb": None if not size else round(size / 1e6, 1), "step_weight_mb": round(weights / 1e6, 1),
        "floor_ms": round(weights / (bandwidth * 1e9) * 1e3, 3), "measured_beside_k": measured_at,
    }
    for key in ("agreement", "serving_agreement", "human_agreement", "exit_top1_vs_fp32", "hidden_rel_err", "positions"):
        row[key] = None if fidelity is None else fidelity.get(key)
    return row


if __name__ == "__main__":
    sys.exit(main())
