"""`offramp bench soak` (`scripts/soak`): N concurrent edge sessions through one real `offramp cloud serve` for as long as asked.

    scripts/soak --duration 600                       # starts its own cloud on the tests' tiny model
    scripts/soak --duration 3600 --sessions 128 --kv-budget-mb 4
    scripts/soak --cloud ws://gpu-box:8700 --model DIR --exit-layer 15 --duration 600

Prints throughput, error count and the cloud's peak memory (see `offramp.bench.load_driver` for what counts as an error);
exits 1 if there was any error. The same driver, with the same defaults, runs for a minute in CI
(`tests/reliability/test_load.py`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

from offramp.bench.load_driver import LoadConfig, run_load

TINY = "tiny"
TINY_EXIT_LAYER = 2


def build_parser() -> argparse.ArgumentParser:
    d = LoadConfig(url="")
    p = argparse.ArgumentParser(prog="offramp bench soak", description=__doc__.split("\n")[0])
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    p.add_argument("--sessions", type=int, default=d.sessions, help="concurrent edge sessions, each its own link")
    p.add_argument("--cloud", default=None, help="ws://HOST:PORT of a running cloud (default: start one here)")
    p.add_argument("--cloud-pid", type=int, default=None, help="with --cloud on this machine: its pid, for memory figures")
    p.add_argument("--model", default=TINY, help="'tiny' (the tests' random 4-layer Llama), a checkpoint dir, or 'default'")
    p.add_argument("--exit-layer", type=int, default=None, help=f"K (default {TINY_EXIT_LAYER} for tiny, else 15)")
    p.add_argument("--kv-budget-mb", type=float, default=1.0, help="the started cloud's KV budget (small, so eviction is exercised)")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="tokens per request")
    p.add_argument("--prompt-tokens", type=int, default=d.prompt_tokens)
    p.add_argument("--codec", default=d.codec)
    p.add_argument("--timeout", type=float, default=d.timeout_s, help="the edges' cloud timeout; a later answer is an error")
    p.add_argument("--warmup", type=float, default=d.warmup_s, help="seconds before the RSS baseline is taken")
    p.add_argument("--verify-every", type=int, default=d.verify_every, help="teacher-force every n-th request (0: never)")
    p.add_argument("--cloud-token-file", type=Path, default=None, help="the cloud's bearer token (else $OFFRAMP_CLOUD_TOKEN, else $OFFRAMP_TOKEN)")
    p.add_argument("--log", type=Path, default=None, help="the started cloud's log (default: a temp file)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")
    return p


def load_edge_model(spec: str, workdir: Path) -> tuple[str, object]:
    """(what `--model` the cloud gets, the model for the edges); 'tiny' is written to `workdir` first."""
    from offramp.models import load_model

    if spec == TINY:
        from offramp.models.tiny import save_tiny_checkpoint

        spec = str(save_tiny_checkpoint(workdir / "tiny", num_layers=4, seed=11))
    return spec, load_model(spec)[0]


def main(argv: list[str] | None = None) -> int:
    import torch

    from offramp.bench.processes import CloudServer
    from offramp.edge.config import cloud_token

    args = build_parser().parse_args(argv)
    torch.set_num_threads(1)  # 2 shared cores: the cloud has the other one
    exit_layer = args.exit_layer if args.exit_layer is not None else (TINY_EXIT_LAYER if args.model == TINY else 15)
    token = cloud_token(args.cloud_token_file)
    with tempfile.TemporaryDirectory(prefix="offramp-soak-") as tmp:
        spec, model = load_edge_model(args.model, Path(tmp))
        server = None
        url, pid = args.cloud, args.cloud_pid
        if url is None:
            extra = ["--kv-budget-mb", str(args.kv_budget_mb), "--max-sessions-per-client", str(max(64, args.sessions)),
                     "--max-sessions", str(max(256, args.sessions))]
            server = CloudServer(model=spec, exit_layer=exit_layer, extra_args=extra, log_path=args.log or Path(tmp) / "cloud.log")
            server.start()
            url, pid = f"ws://127.0.0.1:{server.port}", server.proc.pid
            print(f"soak: cloud pid {pid} on {url} (log {server.log_path})", file=sys.stderr)
        config = LoadConfig(url=url, exit_layer=exit_layer, sessions=args.sessions, duration_s=args.duration,
                            max_new_tokens=args.max_new_tokens, prompt_tokens=args.prompt_tokens, codec=args.codec,
                            timeout_s=args.timeout, warmup_s=args.warmup, verify_every=args.verify_every, token=token)
        try:
            report = asyncio.run(run_load(config, model, pid))
        finally:
            if server is not None:
                server.stop()
    print(json.dumps(report.to_dict()) if args.json else report.summary())
    return 0 if report.errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
