"""`POST /v1/completions` on the cloud: the whole model in the cloud, the deployment offramp is measured against.

It decodes through the same engine code and batcher as edge sessions (a `CloudPart` holding every layer), so
cloud-only and collaborative requests are served alike and the baseline is as strong as the cloud can make it.
OpenAI-shaped: text or token-id prompt, `model`, `max_tokens`, `temperature`, `top_p`, `seed`, `stream` (SSE
chunks ending with `data: [DONE]`); each choice also carries `token_ids` so a benchmark can compare tokens exactly.
Every other field (stop, logprobs, penalties, ...) is refused with 400 naming it, never ignored: this endpoint is
a measuring baseline, and the edge daemon is the full OpenAI surface.
At most `max_sessions` completions run at once; one more is answered 429 (`too_many_sessions`).
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from aiohttp import web

from offramp.shared.contract import ContextMismatchError, ExtendRequest
from offramp.shared.openai_fields import UnservedFieldError, check_served_fields
from offramp.shared.sampling import SamplingParams

if TYPE_CHECKING:
    from offramp.cloud.server import CloudState

FULL_OWNER = "cloud-only"
MAX_BODY_BYTES = 1 << 20  # HTTP bodies (the app's client_max_size); larger is 413
SERVED_FIELDS = frozenset({"prompt", "model", "max_tokens", "temperature", "top_p", "seed", "stream"})


class CompletionRequestError(ValueError):
    """A request the endpoint refuses with 400; the message names the bad field (`param`, where there is one)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass
class CompletionRequest:
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    seed: int | None
    stream: bool

    @classmethod
    def parse(cls, body: Any, state: "CloudState") -> "CompletionRequest":
        if not isinstance(body, dict):
            raise CompletionRequestError("the request body must be a JSON object")
        try:
            check_served_fields(body, SERVED_FIELDS)
        except UnservedFieldError as exc:
            raise CompletionRequestError(str(exc), exc.field, exc.code) from None
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise CompletionRequestError(f"'model' must be a string, got {_short(model)}", "model", "invalid_type")
        if model is not None and model not in _served_names(state):
            raise CompletionRequestError(f"model {_short(model)} is not served here; this cloud serves {state.model_name!r}", "model", "model_not_found")
        prompt = body.get("prompt")
        if isinstance(prompt, str) and state.tokenizer is None:
            raise CompletionRequestError("this server has no tokenizer: send the prompt as token ids")
        if isinstance(prompt, str):
            ids = state.tokenizer(prompt, add_special_tokens=True)["input_ids"]
        elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            if not all(0 <= t < state.vocab_size for t in prompt):
                raise CompletionRequestError(f"prompt token ids must be in 0..{state.vocab_size - 1}")
            ids = list(prompt)
        else:
            raise CompletionRequestError("'prompt' must be a non-empty string or a non-empty list of token ids")
        if not ids:
            raise CompletionRequestError("'prompt' encodes to no tokens")
        max_tokens = body.get("max_tokens", 16)
        limit = state.config.max_new_tokens
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or not 1 <= max_tokens <= limit:
            raise CompletionRequestError(f"'max_tokens' must be an integer in 1..{limit}, got {_short(max_tokens)}")
        if len(ids) + max_tokens > state.max_positions:
            raise CompletionRequestError(f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the context length {state.max_positions}")
        numbers = {name: body.get(name, default) for name, default in (("temperature", 0.0), ("top_p", 1.0))}
        for name, value in numbers.items():
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise CompletionRequestError(f"'{name}' must be a number, got {_short(value)}")
        try:
            sampling = SamplingParams(float(numbers["temperature"]), float(numbers["top_p"]))
        except (ValueError, OverflowError) as exc:  # out of range, or an integer beyond any float
            raise CompletionRequestError(_short(exc)) from None
        seed = body.get("seed")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63):
            raise CompletionRequestError(f"'seed' must be an integer in [0, 2**63), got {_short(seed)}")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise CompletionRequestError(f"'stream' must be a boolean, got {_short(stream)}")
        return cls(ids, max_tokens, sampling, seed, stream)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


async def generate(state: "CloudState", req: CompletionRequest):
    """Yield token ids from the whole model, one batched step at a time; frees the session at the end.

    The session shares the cloud's one table and budget with edge sessions, so it may be evicted under KV
    pressure mid-generation; like an edge, it then rebuilds its context (here from its own token ids).
    """
    session = f"full-{uuid.uuid4().hex}"
    seed = req.seed if req.seed is not None else int(np.random.default_rng().integers(0, 2**63 - 1))
    state.contexts.open(session, FULL_OWNER)
    try:
        context = list(req.prompt_ids)
        start = 0
        while len(context) - len(req.prompt_ids) < req.max_tokens:
            step = ExtendRequest(session, start, _embed(state, context[start:]), FULL_OWNER, sampling=req.sampling, seed=seed)
            try:
                result = await state.full_batcher.submit(step)
            except ContextMismatchError as exc:  # evicted under memory pressure: rebuild from what it still holds
                if exc.have == 0 and session not in state.contexts:
                    state.contexts.open(session, FULL_OWNER)
                start = exc.have
                continue
            token = int(result.token)
            yield token
            context.append(token)
            if token in state.stop_ids or result.length >= state.max_positions:
                return
            start = result.length
    finally:
        state.contexts.close(session, FULL_OWNER)


@torch.inference_mode()
def _embed(state: "CloudState", ids: list[int]) -> np.ndarray:
    return state.embed_tokens(torch.tensor(ids)).float().cpu().numpy()


async def handle_completions(request: web.Request) -> web.StreamResponse:
    from offramp.cloud.server import loaded

    state = loaded(request)
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        return error_response(400, f"malformed JSON body: {exc}")
    except RecursionError:
        return error_response(400, "malformed JSON body: nested too deeply")
    except web.HTTPRequestEntityTooLarge:
        return error_response(413, f"request body is larger than the limit of {MAX_BODY_BYTES} bytes", "request_too_large")
    try:
        req = CompletionRequest.parse(body, state)
    except CompletionRequestError as exc:
        return error_response(400, str(exc), exc.code, exc.param)
    limit = state.config.max_sessions
    if state.completions_inflight >= limit:  # each holds a whole-model session: the same cap as edge sessions
        state.metrics.errors.labels("too_many_sessions").inc()
        return error_response(429, f"{state.completions_inflight} completions are running, this cloud's limit ({limit}); retry shortly", "too_many_sessions")
    state.metrics.completions.inc()
    state.completions_inflight += 1
    try:
        return await _respond(request, state, req)
    finally:
        state.completions_inflight -= 1


async def _respond(request: web.Request, state: "CloudState", req: CompletionRequest) -> web.StreamResponse:
    rid, created = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    head = {"id": rid, "object": "text_completion", "created": created, "model": state.model_name}
    tokens: list[int] = []
    text_so_far = ""
    if not req.stream:
        async for token in generate(state, req):
            tokens.append(token)
        state.metrics.completion_tokens.inc(len(tokens))
        text = _decode(state, tokens)
        choice = {"index": 0, "text": text, "token_ids": tokens, "finish_reason": _finish(state, tokens, req), "logprobs": None}
        return web.json_response({**head, "choices": [choice], "usage": _usage(req, tokens)})
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)
    async for token in generate(state, req):
        tokens.append(token)
        text = _decode(state, tokens)
        delta, text_so_far = text[len(text_so_far):], text
        chunk = {**head, "choices": [{"index": 0, "text": delta, "token_ids": [token], "finish_reason": None, "logprobs": None}]}
        await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
    state.metrics.completion_tokens.inc(len(tokens))
    final = {**head, "choices": [{"index": 0, "text": "", "token_ids": [], "finish_reason": _finish(state, tokens, req), "logprobs": None}],
             "usage": _usage(req, tokens)}
    await resp.write(f"data: {json.dumps(final)}\n\n".encode())
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


def _decode(state: "CloudState", tokens: list[int]) -> str:
    return "" if state.tokenizer is None else state.tokenizer.decode(tokens, skip_special_tokens=True)


def _finish(state: "CloudState", tokens: list[int], req: CompletionRequest) -> str:
    return "stop" if tokens and tokens[-1] in state.stop_ids else "length"


def _usage(req: CompletionRequest, tokens: list[int]) -> dict[str, int]:
    n = len(req.prompt_ids)
    return {"prompt_tokens": n, "completion_tokens": len(tokens), "total_tokens": n + len(tokens)}


def error_response(status: int, message: str, code: str | None = None, param: str | None = None) -> web.Response:
    """An OpenAI-shaped error body."""
    kind = {400: "invalid_request_error", 401: "authentication_error", 413: "invalid_request_error", 429: "rate_limit_error"}.get(status, "server_error")
    return web.json_response({"error": {"message": message, "type": kind, "param": param, "code": code}}, status=status)


def _served_names(state: CloudState) -> set[str]:
    """What a client may call this cloud's model: its configured spec, 'default' and the name an edge serves it
    as (the default model's own name, a checkpoint dir's name), so a request written for the edge daemon works."""
    from offramp.models.edge_dir import model_name

    return {state.model_name, "default", model_name(state.config.model)}
