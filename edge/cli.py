"""`offramp generate` and `offramp edge serve`: flags into an `EdgeConfig`, then the one edge service.

Credentials have one spelling in every edge command: `--cloud-token-file` is the token this edge sends to the
cloud (else $OFFRAMP_CLOUD_TOKEN, else $OFFRAMP_TOKEN); `--token-file` is only ever the token clients must send
to this server (the daemon's own).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

from offramp.edge.config import EdgeConfig, cloud_token
from offramp.edge.decode_loop import CATCH_UP_MODES, CLOUD, GenerationStats
from offramp.edge.precision import EDGE_PRECISIONS
from offramp.edge.text import TextAssembler
from offramp.shared.cli import add_exit_layers_flag, config_from_args
from offramp.shared.codecs import CODECS, DEFAULT_CODEC
from offramp.shared.sampling import SamplingParams


def add_edge_flags(p: argparse.ArgumentParser, default_cloud: str | None) -> None:
    """What the edge runs, how it decides and how it reaches the cloud: the same flags for generate and edge serve."""
    p.add_argument("--edge", type=Path, default=None, metavar="DIR",
                   help="an exported edge directory (`offramp export --out DIR`); needs no torch")
    p.add_argument("--model", default="default",
                   help="without --edge: 'default', a local HF checkpoint dir, or a .gguf file, exported into the cache first (needs the cloud extra)")
    add_exit_layers_flag(p, required=False, help="K: the edge runs layers 0..K-1 (default 15; with --edge, the directory's); several "
                         "(`--exit-layers 8 15`, increasing): early exits inside the edge, the last is K")
    if default_cloud is None:
        p.add_argument("--cloud", required=True, help="'none' (edge-standalone), 'local' (in-process), or ws://HOST:PORT")
    else:
        p.add_argument("--cloud", default=default_cloud, help="'local' (in-process), 'none' (edge-standalone), or ws://HOST:PORT")
    p.add_argument("--cloud-token-file", type=Path, default=None,
                   help="file holding the bearer token for a ws:// cloud (else $OFFRAMP_CLOUD_TOKEN, else $OFFRAMP_TOKEN)")
    p.add_argument("--edge-precision", choices=EDGE_PRECISIONS, default="auto",
                   help="auto: the int8 graph standalone, q4 when collaborating (its layer-K states equal fp32's; int8's change the cloud's answers)")
    p.add_argument("--codec", choices=sorted(CODECS), default=DEFAULT_CODEC, help="hidden-state codec on the link (int8o: int8 with fp16 outlier channels)")
    p.add_argument("--threshold", type=float, default=None, help="exit confidence threshold (> 1 never exits); default: the calibrated one, else 0.9")
    p.add_argument("--head", type=Path, default=None, help="with --model: a trained exit head dir to export (default: the one train-exits wrote)")
    p.add_argument("--no-trained-head", action="store_true", help="with --model: export the untrained final-norm head (max-prob rule)")
    p.add_argument("--no-lossless", dest="lossless", action="store_false",
                   help="exit mode: confident edge tokens are emitted without waiting for the cloud (the most cloud savings, a "
                        "calibrated agreement instead of the full model's tokens); default: lossless, every token confirmed")
    p.add_argument("--catch-up", choices=CATCH_UP_MODES, default="lazy", help="exit mode: exited tokens' states go up with the next request, or at once")
    p.add_argument("--max-draft", type=int, default=16, help="edge drafts ahead of the last confirmed token, at most (the controller adapts below it)")
    p.add_argument("--fixed-draft", type=int, default=0, help="speculate exactly this many drafts ahead, no adaptation (benchmarks; 0: adaptive)")
    p.add_argument("--cloud-timeout", type=float, default=10.0, help="seconds an escalation may take before the edge falls back")
    p.add_argument("--insecure", action="store_true", help="do not verify the wss:// cloud's certificate")
    p.add_argument("--cloud-ca-file", type=Path, default=None, help="CA bundle for a wss:// cloud with a private certificate")


def edge_config(args: argparse.Namespace, **overrides: Any) -> EdgeConfig:
    """The EdgeConfig the shared flags describe (flags whose meaning differs from the field are mapped here)."""
    layers = args.exit_layers
    return config_from_args(
        EdgeConfig, args,
        exit_layer=layers[-1] if layers else None,
        early_exits=tuple(layers[:-1]) if layers else None,
        precision=args.edge_precision,
        trained_head=not args.no_trained_head,
        cloud_token=cloud_token(args.cloud_token_file),
        cloud_timeout_s=args.cloud_timeout,
        verify_tls=not args.insecure,
        **overrides,
    )


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text with edge + cloud (in-process or over the network)")
    add_edge_flags(p, default_cloud="local")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="send the prompt as one user message through the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--cloud-only", action="store_true", help="baseline: run every layer in this process (needs the cloud extra)")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.set_defaults(func=run_generate)

    edge = subparsers.add_parser("edge", help="the edge daemon")
    edge_commands = edge.add_subparsers(dest="edge_command", required=True)
    register_serve(edge_commands)


def register_serve(subparsers: argparse._SubParsersAction) -> None:
    """`offramp edge serve`: an OpenAI-compatible HTTP API on this machine (see offramp.edge.daemon)."""
    from offramp.edge.daemon import DEFAULT_PORT

    p = subparsers.add_parser("serve", help="serve an OpenAI-compatible API (loopback by default)")
    add_edge_flags(p, default_cloud=None)
    p.add_argument("--host", default="127.0.0.1", help="bind address; anything but loopback needs --token-file")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port (printed at start)")
    p.add_argument("--token-file", type=Path, default=None, help="file holding the bearer token clients must send to this daemon")
    p.add_argument("--metrics-require-token", action="store_true", help="/metrics needs the bearer token too (default: open, like /healthz)")
    p.add_argument("--max-sessions", type=int, default=16, help="concurrent requests; more get 429")
    p.add_argument("--workers", type=int, default=None, help="compute threads (default: CPU cores)")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit (413 beyond)")
    p.add_argument("--served-model-name", default=None, help="the model id clients see (default: the model's name)")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from offramp.edge.daemon import DaemonConfig, serve

    config = config_from_args(DaemonConfig, args, engine=edge_config(args), default_max_tokens=min(256, args.max_tokens_limit))
    return serve(config)


def run_generate(args: argparse.Namespace) -> int:
    if args.cloud_only:
        result = _cloud_only(args)
    else:
        result = asyncio.run(_collaborative(args))
    out = sys.stdout
    if args.json:
        json.dump(result, out)
        out.write("\n")
    else:
        out.write("\n")
        s = result["stats"]
        print(
            f"[{result['mode']}] {s['tokens']} tokens, {s['edge_exits']} at the edge, {s['escalations']} escalated, "
            f"{s['fallback_tokens']} fallback; cloud layer-tokens {s['cloud_layer_tokens']}/{s['full_layer_tokens']}; "
            f"{s['bytes_up']} B up, {s['bytes_down']} B down; ttft {s['ttft_s']:.3f}s, wall {s['wall_s']:.2f}s",
            file=sys.stderr,
        )
    return 0


async def _collaborative(args: argparse.Namespace) -> dict[str, Any]:
    from offramp.edge.service import EdgeService
    from offramp.edge.text_stream import TextRequest

    service = await asyncio.to_thread(EdgeService.open, edge_config(args, max_sessions=1))
    try:
        await service.check_cloud()
        messages = [{"role": "user", "content": args.prompt}]
        prompt_ids = service.encode_chat(messages) if args.chat else service.encode_text(args.prompt)
        room = max(1, service.max_positions - len(prompt_ids))
        request = TextRequest(prompt_ids, min(args.max_new_tokens, room), SamplingParams(args.temperature, args.top_p), args.seed)
        stream = service.generate(request)
        try:
            async for delta in stream:
                if not args.json:
                    sys.stdout.write(delta.text)
                    sys.stdout.flush()
        finally:
            await stream.aclose()
        result = stream.result
        assert result is not None
        if result.stats.fallback_tokens:
            print(f"offramp: the cloud was unavailable ({service.health.last_error or 'unreachable'}); "
                  f"{result.stats.fallback_tokens} tokens were generated at the edge alone (source edge-fallback)", file=sys.stderr)
        return {
            "text": result.text,
            "token_ids": result.token_ids,
            "sources": result.sources,
            "finish_reason": result.finish_reason,
            "mode": result.mode,
            "exit_layer": service.exit_layer,
            "threshold": service.threshold,
            "exit_rule": service.exit_setup.describe(),
            **service.describe_early_exits(),
            "edge_precision": service.precision,
            "lossless": service.config.lossless,
            "codec": service.config.codec,
            "edge_dir": str(service.edge_dir),
            "stats": result.stats.to_dict(),
        }
    finally:
        await service.aclose()


def _cloud_only(args: argparse.Namespace) -> dict[str, Any]:
    """The baseline: every layer in this process, stopping on the same ids as the edge (shared.tokens)."""
    try:
        from offramp.cloud.full_model import FullModelRunner
        from offramp.models import load_model
    except ImportError as exc:
        from offramp.shared.errors import OfframpError

        raise OfframpError(f"--cloud-only runs the whole model here, which needs {exc.name}: install the cloud extra") from exc
    from offramp.shared.tokens import stop_token_ids

    model, tokenizer = load_model(args.model)
    if args.chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True)
        prompt_ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    else:
        prompt_ids = list(tokenizer(args.prompt, add_special_tokens=True)["input_ids"])
    runner = FullModelRunner(model)
    stats = GenerationStats()
    started = time.perf_counter()
    token_ids: list[int] = []
    assembler = TextAssembler(tokenizer)
    sampling = SamplingParams(args.temperature, args.top_p)
    for token in runner.generate_ids(prompt_ids, args.max_new_tokens, sampling, args.seed, stop_token_ids(tokenizer)):
        token_ids.append(token)
        if len(token_ids) == 1:
            stats.ttft_s = time.perf_counter() - started
        piece = assembler.add(token)
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    tail = assembler.finish()
    if not args.json:
        sys.stdout.write(tail)
    stats.tokens = stats.escalations = len(token_ids)
    stats.cloud_layer_tokens = stats.full_layer_tokens = runner.layer_tokens
    stats.wall_s = time.perf_counter() - started
    return {
        "text": assembler.text,
        "token_ids": token_ids,
        "sources": [CLOUD] * len(token_ids),
        "mode": "cloud-only",
        "exit_layer": None,
        "threshold": None,
        "stats": stats.to_dict(),
    }
