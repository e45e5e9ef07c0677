#!/usr/bin/env python
"""The offramp SDK in three ways: a running daemon (sync and async), and in-process without a daemon.

    offramp edge serve --cloud local &                             # in another shell (or --cloud none / ws://...)
    .venv/bin/python scripts/example_sdk.py --url http://127.0.0.1:8710
    .venv/bin/python scripts/example_sdk.py --local                # no daemon: the edge runs in this process
    .venv/bin/python scripts/example_sdk.py --local --edge DIR     # ... from an exported edge directory
"""

from __future__ import annotations

import argparse
import asyncio

from offramp.edge import AsyncClient, Client, Completion, LocalEngine


def summary(done: Completion) -> str:
    s = done.stats
    return (
        f"[{done.mode}] {s.get('tokens')} tokens: {s.get('edge_exits')} at the edge, {s.get('escalations')} escalated, "
        f"{s.get('fallback_tokens')} fallback; {s.get('bytes_up')} B up; finish={done.finish_reason}"
    )


def with_daemon(url: str, token: str | None, prompt: str, max_tokens: int) -> None:
    client = Client(url, token=token)
    print("health:", client.health()["cloud"])
    done = client.generate(prompt, chat=True, max_tokens=max_tokens)
    print(done.text, "\n", summary(done), sep="")

    print("\nstreaming:")
    stream = client.stream("Write a haiku about rain.", chat=True, max_tokens=max_tokens)
    for piece in stream:
        print(piece, end="", flush=True)
    print("\n" + summary(stream.completion))

    async def run_async() -> None:
        async with AsyncClient(url, token=token) as aclient:
            stream = aclient.stream("Name three planets.", chat=True, max_tokens=max_tokens)
            async for piece in stream:
                print(piece, end="", flush=True)
            print("\n" + summary(stream.completion))

    print("\nasync streaming:")
    asyncio.run(run_async())


def in_process(cloud: str, edge: str | None, prompt: str, max_tokens: int) -> None:
    with LocalEngine(edge=edge, cloud=cloud) as engine:
        done = engine.generate(prompt, chat=True, max_tokens=max_tokens)
        print(done.text, "\n", summary(done), sep="")
        for piece in engine.stream("Write a haiku about rain.", chat=True, max_tokens=max_tokens):
            print(piece, end="", flush=True)
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8710", help="the daemon's base URL")
    parser.add_argument("--token", default=None, help="bearer token, if the daemon was started with --token-file")
    parser.add_argument("--local", action="store_true", help="no daemon: embed the edge in this process")
    parser.add_argument("--cloud", default="local", help="with --local: none | local | ws://HOST:PORT")
    parser.add_argument("--edge", default=None, help="with --local: an exported edge directory (default: export the default model)")
    parser.add_argument("--prompt", default="What is gravity?")
    parser.add_argument("--max-tokens", type=int, default=48)
    args = parser.parse_args()
    if args.local:
        in_process(args.cloud, args.edge, args.prompt, args.max_tokens)
    else:
        with_daemon(args.url, args.token, args.prompt, args.max_tokens)


if __name__ == "__main__":
    main()
