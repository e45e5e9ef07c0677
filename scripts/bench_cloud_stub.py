"""A stand-in cloud for the bench, used only while `offramp cloud serve` does not exist in this checkout.

It serves the same two things the bench needs from the real server, with the same engine code underneath
(`DeepEngine` for the deep layers, `FullModelRunner` for the baseline), one request at a time, no batching:
- `GET /v1/edge` (WebSocket): msgpack frames {op: open|extend|close, ...}; hidden states travel through the
  shared codecs, as on the real link;
- `POST /v1/completions` with `stream: true`: the cloud-only baseline, token ids in each SSE chunk;
- `GET /healthz`.
`StubCloudLink` is its edge side (a `CloudLink`). The bench says in its report which cloud it measured.

    python scripts/bench_cloud_stub.py --model default --exit-layer 20 --port 8700
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

import msgpack
import numpy as np
from aiohttp import WSMsgType, web

from offramp.cloud.engine import DeepResult, ExtendRequest
from offramp.edge.link import CloudUnavailableError, LinkStats
from offramp.shared.codecs import get_codec
from offramp.shared.sampling import SamplingParams

MAX_MSG = 64 << 20


def make_app(model, exit_layer: int) -> web.Application:
    """The stub's aiohttp app: engine and baseline share the model's weights."""
    from offramp.cloud.context import ContextManager
    from offramp.cloud.engine import DeepEngine
    from offramp.cloud.full_model import FullModelRunner
    from offramp.models.split import CloudPart

    engine = DeepEngine(CloudPart(model, exit_layer), ContextManager())
    runner = FullModelRunner(model)
    lock = asyncio.Lock()  # one forward at a time, like a single CPU worker

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "exit_layer": exit_layer})

    async def edge_ws(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_MSG)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type != WSMsgType.BINARY:
                break
            frame = msgpack.unpackb(msg.data)
            op, sid = frame["op"], frame["session"]
            try:
                if op == "open":
                    engine.contexts.open(sid)
                    reply = {"ok": True}
                elif op == "close":
                    engine.contexts.close(sid)
                    reply = {"ok": True}
                else:
                    rows, width = frame["shape"]
                    hidden = get_codec(frame["codec"]).decode(frame["payload"], rows, width)
                    req = ExtendRequest(sid, frame["start"], hidden, want_token=frame["want_token"],
                                        sampling=SamplingParams(frame["temperature"], frame["top_p"]), u=frame["u"])
                    async with lock:
                        r = await asyncio.to_thread(engine.extend, req)
                    reply = {"ok": True, "start": r.start, "predicted": r.predicted, "logprobs": r.logprobs,
                             "token": r.token, "length": r.length}
            except Exception as exc:  # an error frame, never a dropped connection
                reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}", "have": getattr(exc, "have", None)}
            await ws.send_bytes(msgpack.packb(reply))
        return ws

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        prompt = body["prompt"]
        if not (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)):
            return web.json_response({"error": {"message": "the stub takes token-id prompts only"}}, status=400)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        gen = runner.generate_ids(prompt, int(body.get("max_tokens", 16)))
        while True:
            async with lock:
                token = await asyncio.to_thread(next, gen, None)
            if token is None:
                break
            chunk = {"choices": [{"index": 0, "text": "", "token_ids": [token]}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
        return resp

    app = web.Application(client_max_size=MAX_MSG)
    app.router.add_get("/healthz", health)
    app.router.add_get("/v1/edge", edge_ws)
    app.router.add_post("/v1/completions", completions)
    return app


class StubCloudLink:
    """The edge side of the stub: one WebSocket, one request in flight at a time."""

    def __init__(self, url: str, codec: str, deep_layers: int, timeout_s: float = 60.0) -> None:
        self.url = url.rstrip("/") + "/v1/edge"
        self.codec = codec
        self._codec = get_codec(codec)
        self.deep_layers = deep_layers
        self.timeout_s = timeout_s
        self.stats = LinkStats()
        self._http = None
        self._ws = None
        self._lock = asyncio.Lock()

    async def _call(self, frame: dict) -> dict:
        import aiohttp

        async with self._lock:
            try:
                if self._ws is None or self._ws.closed:
                    self._http = self._http or aiohttp.ClientSession()
                    self._ws = await self._http.ws_connect(self.url, max_msg_size=MAX_MSG, timeout=self.timeout_s)
                data = msgpack.packb(frame)
                await self._ws.send_bytes(data)
                msg = await asyncio.wait_for(self._ws.receive(), self.timeout_s)
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                raise CloudUnavailableError(f"stub cloud: {exc}") from exc
            if msg.type != WSMsgType.BINARY:
                raise CloudUnavailableError(f"stub cloud closed the link ({msg.type})")
            self.stats.bytes_up += len(data)
            self.stats.bytes_down += len(msg.data)
            self.stats.round_trips += 1
            return msgpack.unpackb(msg.data)

    async def open_session(self, session_id: str) -> None:
        await self._call({"op": "open", "session": session_id})

    async def extend(self, session_id, start, hidden, want_token, sampling, u) -> DeepResult:
        from offramp.cloud.engine import ContextMismatchError

        rows, width = hidden.shape
        reply = await self._call({
            "op": "extend", "session": session_id, "start": int(start), "shape": [rows, width], "codec": self.codec,
            "payload": self._codec.encode(np.asarray(hidden, dtype=np.float32)), "want_token": bool(want_token),
            "temperature": sampling.temperature, "top_p": sampling.top_p, "u": float(u),
        })
        if not reply["ok"]:
            if reply.get("have") is not None:
                raise ContextMismatchError(session_id, start, reply["have"])
            raise CloudUnavailableError(reply["error"])
        return DeepResult(reply["start"], reply["predicted"], reply["logprobs"], reply["token"], reply["length"])

    async def close_session(self, session_id: str) -> None:
        await self._call({"op": "close", "session": session_id})

    async def aclose(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
        self._ws = self._http = None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="default")
    p.add_argument("--exit-layer", type=int, default=15)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8700)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    from offramp.models import load_model

    model, _ = load_model(args.model)
    web.run_app(make_app(model, args.exit_layer), host=args.host, port=args.port, print=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
