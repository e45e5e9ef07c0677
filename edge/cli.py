"""`offramp generate` and `offramp edge serve`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from offramp.edge.assemble import EDGE_PRECISIONS, build_edge_runtime, build_local_link, resolve_precision
from offramp.edge.generation import CATCH_UP_MODES, CLOUD, CollaborativeDecoder, DecodeOptions, GenerationStats
from offramp.shared.cli import config_from_args
from offramp.shared.codecs import CODECS, DEFAULT_CODEC
from offramp.shared.sampling import SamplingParams


def add_decision_flags(p: argparse.ArgumentParser) -> None:
    """How the edge decides and talks to the cloud: the same flags for generate and edge serve."""
    p.add_argument("--threshold", type=float, default=None, help="exit confidence threshold (> 1 never exits); default: the calibrated one, else 0.9")
    p.add_argument("--head", type=Path, default=None, help="a trained exit head dir (default: the one train-exits wrote for this model and K)")
    p.add_argument("--no-trained-head", action="store_true", help="use the untrained final-norm head with the max-prob rule")
    p.add_argument("--catch-up", choices=CATCH_UP_MODES, default="lazy", help="when exited tokens' states go up: with the next escalation, or at once")
    p.add_argument("--draft-ahead", type=int, default=0, help="edge tokens drafted while an escalation is in flight (0: off)")
    p.add_argument("--lossless", action="store_true", help="greedy only: emit edge tokens after the cloud confirmed them (output = full model)")
    p.add_argument("--max-draft", type=int, default=8, help="lossless: edge tokens verified per round trip at most")
    p.add_argument("--cloud-timeout", type=float, default=10.0, help="seconds an escalation may take before the edge falls back")
    p.add_argument("--insecure", action="store_true", help="do not verify the wss:// cloud's certificate")
    p.add_argument("--cloud-ca-file", default=None, help="CA bundle for a wss:// cloud with a private certificate")


TOKEN_ENVS = ("OFFRAMP_TOKEN", "OFFRAMP_CLOUD_TOKEN")  # the edge's own name first, then the one the cloud reads


def cloud_token(path: Path | None) -> str | None:
    """The cloud's bearer token from a file (whitespace stripped), else $OFFRAMP_TOKEN, else $OFFRAMP_CLOUD_TOKEN.

    Both names so one exported variable serves `offramp cloud serve` and the edge on a dev machine.
    """
    from offramp.shared.auth import read_token

    if path is not None:
        return read_token(path, TOKEN_ENVS[0])
    for env in TOKEN_ENVS:
        token = read_token(None, env)
        if token is not None:
            return token
    return None


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("generate", help="generate text with edge + cloud (in-process or over the network)")
    p.add_argument("--model", default="default", help="'default', a local HF checkpoint dir, or a .gguf file")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="send the prompt as one user message through the chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--exit-layer", type=int, default=15)
    add_decision_flags(p)
    p.add_argument("--edge-precision", choices=EDGE_PRECISIONS, default="auto",
                   help="auto: the int8 graph standalone, q4 when collaborating (its layer-K states equal fp32's; int8's change the cloud's answers)")
    p.add_argument("--cloud", default="local", help="'local' (in-process), 'none' (edge-standalone), or ws://HOST:PORT")
    p.add_argument("--token-file", type=Path, default=None, help="file holding the cloud's bearer token (else $OFFRAMP_TOKEN or $OFFRAMP_CLOUD_TOKEN)")
    p.add_argument("--cloud-only", action="store_true", help="baseline: run every layer in the cloud")
    p.add_argument("--codec", choices=sorted(CODECS), default=DEFAULT_CODEC, help="hidden-state codec on the link (int8o: int8 with outlier channels exact)")
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
    p.add_argument("--cloud", required=True, help="'none' (edge-standalone), 'local' (in-process), or ws://HOST:PORT")
    p.add_argument("--model", default="default", help="'default', a local HF checkpoint dir, or a .gguf file")
    p.add_argument("--exit-layer", type=int, default=15)
    add_decision_flags(p)
    p.add_argument("--edge-precision", choices=EDGE_PRECISIONS, default="auto",
                   help="auto: the int8 graph standalone, q4 when collaborating (its layer-K states equal fp32's; int8's change the cloud's answers)")
    p.add_argument("--codec", choices=sorted(CODECS), default=DEFAULT_CODEC, help="hidden-state codec on the link (int8o: int8 with outlier channels exact)")
    p.add_argument("--host", default="127.0.0.1", help="bind address; anything but loopback needs --token-file")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help="0 picks a free port (printed at start)")
    p.add_argument("--token-file", type=Path, default=None, help="file holding the bearer token clients must send")
    p.add_argument("--cloud-token-file", type=Path, default=None, help="file holding the bearer token for a ws:// cloud (else $OFFRAMP_TOKEN or $OFFRAMP_CLOUD_TOKEN)")
    p.add_argument("--max-sessions", type=int, default=16, help="concurrent requests; more get 429")
    p.add_argument("--workers", type=int, default=None, help="compute threads (default: CPU cores)")
    p.add_argument("--max-tokens-limit", type=int, default=4096, help="largest max_tokens a request may ask for")
    p.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body limit (413 beyond)")
    p.add_argument("--served-model-name", default=None, help="the model id clients see (default: the model's name)")
    p.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    from offramp.edge.daemon import DaemonConfig, serve
    from offramp.edge.sessions import EngineConfig

    engine = config_from_args(
        EngineConfig, args,
        precision=resolve_precision(args.edge_precision, args.cloud),
        artifacts=args.head,
        cloud_token=cloud_token(args.cloud_token_file),
        trained_head=not args.no_trained_head,
        cloud_timeout_s=args.cloud_timeout,
        verify_tls=not args.insecure,
        cloud_ca_file=Path(args.cloud_ca_file) if args.cloud_ca_file else None,
    )
    config = config_from_args(DaemonConfig, args, engine=engine, default_max_tokens=min(256, args.max_tokens_limit))
    serve(config)
    return 0


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Plain text, or a single user message through the chat template with the generation prompt (nothing else)."""
    if chat:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


def run_generate(args: argparse.Namespace) -> int:
    from offramp.models import load_model

    model, tokenizer = load_model(args.model)
    prompt_ids = encode_prompt(tokenizer, args.prompt, args.chat)
    sampling = SamplingParams(args.temperature, args.top_p)
    stop_ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    out = sys.stdout
    if args.cloud_only:
        result = _cloud_only(model, prompt_ids, args, sampling, stop_ids, tokenizer, stream=not args.json)
    else:
        from offramp.edge.exit_setup import resolve_exit_setup

        setup = resolve_exit_setup(model, args.exit_layer, args.head, not args.no_trained_head, args.threshold)
        result = asyncio.run(_collaborative(model, prompt_ids, args, setup, sampling, stop_ids, tokenizer))
    if args.json:
        result["text"] = tokenizer.decode(result["token_ids"], skip_special_tokens=True)
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


async def _collaborative(model, prompt_ids, args, setup, sampling, stop_ids, tokenizer) -> dict:
    precision = resolve_precision(args.edge_precision, args.cloud)
    runtime = build_edge_runtime(model, args.exit_layer, precision, args.model, head_dir=setup.head_dir)
    link = None
    if args.cloud == "local":
        link = build_local_link(model, args.exit_layer, args.codec)
    elif args.cloud != "none":
        from offramp.edge.ws_link import WebSocketCloudLink

        link = WebSocketCloudLink(
            args.cloud, codec=args.codec, manifest=getattr(runtime, "manifest", None), token=cloud_token(args.token_file),
            timeout_s=args.cloud_timeout, verify_tls=not args.insecure, ca_file=args.cloud_ca_file,
        )
    decoder = CollaborativeDecoder(runtime, link, model.config.num_hidden_layers, confidence=setup.rule.confidence)
    options = DecodeOptions(args.max_new_tokens, setup.threshold, sampling, args.seed, stop_ids,
                            catch_up=args.catch_up, draft_ahead=args.draft_ahead, lossless=args.lossless, max_draft=args.max_draft)
    token_ids, sources = [], []
    try:
        async for event in decoder.stream(prompt_ids, options):
            token_ids.append(event.token_id)
            sources.append(event.source)
            if not args.json:
                _echo(tokenizer, token_ids)
    finally:
        if link is not None:
            await link.aclose()
    if decoder.stats.fallback_tokens:
        reason = getattr(link, "last_error", None) or "unreachable"
        print(f"offramp: the cloud was unavailable ({reason}); {decoder.stats.fallback_tokens} tokens were generated "
              "at the edge alone (source edge-fallback)", file=sys.stderr)
    return {
        "token_ids": token_ids,
        "sources": sources,
        "mode": decoder.mode,
        "exit_layer": args.exit_layer,
        "threshold": setup.threshold,
        "exit_rule": setup.describe(),
        "edge_precision": precision,
        "stats": decoder.stats.to_dict(),
    }


def _cloud_only(model, prompt_ids, args, sampling, stop_ids, tokenizer, stream: bool) -> dict:
    from offramp.cloud.full_model import FullModelRunner

    runner = FullModelRunner(model)
    stats = GenerationStats()
    started = time.perf_counter()
    token_ids = []
    for token in runner.generate_ids(prompt_ids, args.max_new_tokens, sampling, args.seed, stop_ids):
        token_ids.append(token)
        if len(token_ids) == 1:
            stats.ttft_s = time.perf_counter() - started
        if stream:
            _echo(tokenizer, token_ids)
    stats.tokens = stats.escalations = len(token_ids)
    stats.cloud_layer_tokens = stats.full_layer_tokens = runner.layer_tokens
    stats.wall_s = time.perf_counter() - started
    return {
        "token_ids": token_ids,
        "sources": [CLOUD] * len(token_ids),
        "mode": "cloud-only",
        "exit_layer": None,
        "threshold": None,
        "stats": stats.to_dict(),
    }


_printed: dict[int, int] = {}


def _echo(tokenizer, token_ids: list[int]) -> None:
    """Stream text as it grows (decode the whole so multi-token characters come out right)."""
    text = tokenizer.decode(token_ids, skip_special_tokens=True)
    done = _printed.get(id(token_ids), 0)
    sys.stdout.write(text[done:])
    sys.stdout.flush()
    _printed[id(token_ids)] = len(text)
