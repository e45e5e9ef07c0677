"""`offramp bench TOOL [ARGS...]`: each tool is a module of offramp.bench with `main(argv) -> int`.

The tools import torch and the cloud at the top, so a tool's module is imported only when it runs: `offramp --help`
(and the edge-only install's CLI) never loads them, and each tool parses its own arguments.
"""

from __future__ import annotations

import argparse
import importlib

# tool -> (module, one line of help)
TOOLS = {
    "compare": ("offramp.bench.compare", "collaborative vs cloud-only vs edge-only over emulated links (scripts/bench)"),
    "soak": ("offramp.bench.soak", "concurrent edge sessions through a real cloud for as long as asked (scripts/soak)"),
    "edge-step": ("offramp.bench.edge_step", "edge decode-step latency (and fidelity) of the edge graph precisions"),
    "exit-step": ("offramp.bench.exit_step", "edge time per token with several exits (--exit-layers 8 15) vs one, at forced early-exit rates"),
    "router-signals": ("offramp.bench.router_signals", "which router signals raise the certified exit rate (held-out serving text)"),
    "head-fusion": ("offramp.bench.head_fusion", "the exit head with an earlier layer's state fused in (EAGLE-3) vs without, equal steps"),
    "batching": ("offramp.bench.batching", "deep-layer throughput: one forward per session vs one batched forward"),
    "kv-step": ("offramp.bench.kv_step", "the cloud's batched decode step at long context"),
    "replicas": ("offramp.bench.replicas", "the single cloud server vs Ray Serve with 1 and 2 engine replicas"),
    "timeline": ("offramp.bench.timeline_model", "the timeline model of the pipelined lossless loop"),
    "report": ("offramp.bench.report", "rewrite report.md and the plots of a bench run from its results.json"),
    "link-emulator": ("offramp.bench.link_emulator", "the user-space WAN emulator as a proxy process"),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    bench = subparsers.add_parser("bench", help="benchmarks, the soak and the link emulator (`offramp bench TOOL --help`)",
                                  description="Benchmarks and test tools; each TOOL takes its own arguments (TOOL --help).")
    tools = bench.add_subparsers(dest="tool", required=True, metavar="TOOL")
    for name, (module, summary) in TOOLS.items():
        # No prefix characters and no -h of its own: every argument, `--help` included, goes to the tool's parser.
        tool = tools.add_parser(name, help=summary, add_help=False, prefix_chars="\0")
        tool.add_argument("tool_args", nargs=argparse.REMAINDER)
        tool.set_defaults(func=run_tool, bench_module=module)


def run_tool(args: argparse.Namespace) -> int:
    """Import the tool's module now and hand it its arguments."""
    return int(importlib.import_module(args.bench_module).main(args.tool_args) or 0)
