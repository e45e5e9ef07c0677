"""The OpenAI-compatible surface: validate request bodies into typed requests, shape results into OpenAI objects.

Nothing here touches the model or the network; a malformed request is refused here with an OpenAI-style error
(`{"error": {"message", "type", "param", "code"}}`) and never reaches the engine.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from offramp.edge.text_stream import TextDelta, TextResult, TokenLogprob
from offramp.shared.errors import OfframpError
from offramp.shared.openai_fields import UnservedFieldError, check_served_fields
from offramp.shared.protocol import MAX_TOP_K

MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 256
CHAT_ROLES = {"system", "developer", "user", "assistant"}
MESSAGE_FIELDS = frozenset({"role", "content"})  # a message's name, tool_calls, audio... are refused like top-level fields
# The request fields each endpoint serves; any other field of OpenAI's schemas (tools, response_format, penalties,
# logit_bias, user, ...) is refused with 400 naming it (shared/openai_fields.py).
COMMON_FIELDS = frozenset({"model", "max_tokens", "temperature", "top_p", "stop", "seed", "stream", "stream_options", "n"})
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "logprobs", "best_of", "echo"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs"}
STREAM_OPTIONS = frozenset({"include_usage"})

TokenBytes = Callable[[int], bytes]  # a token id's own bytes (EdgeTokenizer.token_bytes)


class APIError(OfframpError):
    """A request the API refuses, with the HTTP status and the OpenAI error fields to send back."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What the API accepts; anything beyond is a 400 (or 413 for the body size)."""

    served_model: str
    context_length: int
    max_tokens_limit: int = 4096
    default_max_tokens: int = 256
    max_messages: int = 256
    default_temperature: float = 1.0  # OpenAI's default; send 0 for greedy


@dataclass
class GenerateParams:
    """The sampling fields both endpoints share, validated."""

    max_tokens: int | None
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    logprobs: bool = False  # report each token's log-prob
    top_logprobs: int = 0  # and this many alternatives
    max_tokens_field: str = "max_tokens"  # the name the budget came under, for errors


@dataclass
class CompletionRequest:
    model: str
    prompt: str | list[int]
    params: GenerateParams


@dataclass
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    params: GenerateParams


def parse_json_body(raw: bytes) -> dict[str, Any]:
    """Bytes -> a JSON object, refusing invalid UTF-8, malformed JSON, non-finite numbers and non-objects.

    The Content-Type is not looked at: `curl -d` sends JSON as application/x-www-form-urlencoded by default,
    and the body's bytes decide anyway."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(f"request body is not valid UTF-8 (byte {exc.start})", code="invalid_utf8") from None
    if not text.strip():
        raise APIError("request body is empty; expected a JSON object", code="invalid_json")
    try:
        body = json.loads(text, parse_constant=_reject_constant)
    except (json.JSONDecodeError, RecursionError) as exc:
        detail = f"line {exc.lineno} column {exc.colno}: {exc.msg}" if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
        raise APIError(f"request body is not valid JSON ({detail})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(f"request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _reject_constant(name: str) -> Any:
    raise APIError(f"request body contains {name}, which is not valid JSON", code="invalid_json")


def _field(body: dict[str, Any], name: str, kinds: tuple[type, ...], kind_name: str, default: Any = None) -> Any:
    """Fetch an optional field; null counts as absent; bool is never accepted as a number."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds:
        raise APIError(f"'{name}' must be {kind_name}, got a boolean", param=name, code="invalid_type")
    if not isinstance(value, kinds):
        raise APIError(f"'{name}' must be {kind_name}, got {_json_type(value)}", param=name, code="invalid_type")
    return value


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "an integer", float: "a number"}.get(
        type(value), type(value).__name__
    )


def _number(body: dict[str, Any], name: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    given = _field(body, name, (int, float), "a number", default)
    try:
        value = float(given)
    except OverflowError:  # an integer literal beyond any float (JSON allows 400 digits)
        raise APIError(f"'{name}' is far out of range ({len(str(abs(given)))} digits)", param=name, code="invalid_value") from None
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        bracket = "(" if low_open else "["
        raise APIError(f"'{name}' must be in {bracket}{low}, {high}], got {value!r}", param=name, code="invalid_value")
    return value


def _check_model(body: dict[str, Any], limits: Limits) -> str:
    model = _field(body, "model", (str,), "a string", limits.served_model)
    if model not in (limits.served_model, "default"):
        raise APIError(
            f"model {model!r} is not served here; this daemon serves {limits.served_model!r}",
            param="model",
            code="model_not_found",
        )
    return limits.served_model


def _refuse_unserved_in(body: dict[str, Any], served: frozenset[str], where: str | None = None) -> None:
    """A field outside `served` (in the body, or in the object at `where`) is a 400 naming it."""
    try:
        check_served_fields(body, served)
    except UnservedFieldError as exc:
        name = f"{where}.{exc.field}" if where else exc.field
        message = str(exc).replace(f"'{exc.field}'", f"'{name}'", 1)
        raise APIError(message, param=name, code=exc.code) from None


def _params(body: dict[str, Any], limits: Limits, max_tokens_names: tuple[str, ...], logprobs: tuple[bool, int]) -> GenerateParams:
    max_tokens, max_tokens_field = None, "max_tokens"
    for name in max_tokens_names:
        value = _field(body, name, (int,), "an integer")
        if value is None:
            continue
        if value < 1:
            raise APIError(f"'{name}' must be >= 1, got {value}", param=name, code="invalid_value")
        if value > limits.max_tokens_limit:
            raise APIError(
                f"'{name}' is {value}, over this daemon's limit of {limits.max_tokens_limit}",
                param=name,
                code="max_tokens_exceeded",
            )
        max_tokens, max_tokens_field = value, name
    _only_one(body, "n")
    temperature = _number(body, "temperature", limits.default_temperature, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0, low_open=True)
    seed = _field(body, "seed", (int,), "an integer")
    if seed is not None and not 0 <= seed < 2**63:
        raise APIError(f"'seed' must be in [0, 2**63), got {seed}", param="seed", code="invalid_value")
    stream = _field(body, "stream", (bool,), "a boolean", False)
    options = _field(body, "stream_options", (dict,), "an object", {})
    if options and not stream:
        raise APIError("'stream_options' is only allowed with 'stream': true", param="stream_options", code="invalid_value")
    _refuse_unserved_in(options, STREAM_OPTIONS, "stream_options")
    include_usage = _field(options, "include_usage", (bool,), "a boolean", False)
    return GenerateParams(max_tokens, temperature, top_p, _stop(body), seed, stream, include_usage, *logprobs, max_tokens_field)


def _only_one(body: dict[str, Any], name: str) -> None:
    """`n` and `best_of`: one choice per request."""
    value = _field(body, name, (int,), "an integer", 1)
    if value != 1:
        raise APIError(f"only {name}=1 is supported, got {name}={value}", param=name, code="unsupported_value")


def _top_count(body: dict[str, Any], name: str) -> int | None:
    value = _field(body, name, (int,), "an integer")
    if value is not None and not 0 <= value <= MAX_TOP_K:
        raise APIError(f"'{name}' must be in 0..{MAX_TOP_K}, got {value}", param=name, code="invalid_value")
    return value


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise APIError("'stop' must be a string or an array of strings", param="stop", code="invalid_type")
    if len(stop) > MAX_STOP_STRINGS:
        raise APIError(f"'stop' has {len(stop)} strings; at most {MAX_STOP_STRINGS}", param="stop", code="invalid_value")
    if any(len(s) > MAX_STOP_CHARS for s in stop):
        raise APIError(f"each stop string must be at most {MAX_STOP_CHARS} characters", param="stop", code="invalid_value")
    return tuple(s for s in stop if s)


def parse_completion(body: dict[str, Any], limits: Limits, vocab_size: int) -> CompletionRequest:
    """POST /v1/completions: `prompt` is a string, a one-string array, or an array of token ids."""
    _refuse_unserved_in(body, COMPLETION_FIELDS)
    model = _check_model(body, limits)
    if "prompt" not in body or body["prompt"] is None:
        raise APIError("'prompt' is required", param="prompt", code="missing_field")
    prompt = body["prompt"]
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise APIError(
                "'prompt' must be a string, an array with one string, or a non-empty array of token ids (one prompt per request)",
                param="prompt",
                code="invalid_type",
            )
        bad = next((t for t in prompt if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise APIError(f"token id {bad} in 'prompt' is outside the vocabulary [0, {vocab_size})", param="prompt", code="invalid_value")
    elif not isinstance(prompt, str):
        raise APIError(f"'prompt' must be a string or an array of token ids, got {_json_type(prompt)}", param="prompt", code="invalid_type")
    if prompt == "":
        raise APIError("'prompt' is empty", param="prompt", code="invalid_value")
    _only_one(body, "best_of")
    if _field(body, "echo", (bool,), "a boolean", False):
        raise APIError("'echo' is not supported", param="echo", code="unsupported_value")
    top = _top_count(body, "logprobs")  # completions: the number of alternatives; 0 = the chosen token's only
    return CompletionRequest(model, prompt, _params(body, limits, ("max_tokens",), (top is not None, top or 0)))


def parse_chat(body: dict[str, Any], limits: Limits) -> ChatRequest:
    """POST /v1/chat/completions: text messages (string content or text parts) with system/user/assistant roles."""
    _refuse_unserved_in(body, CHAT_FIELDS)
    model = _check_model(body, limits)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty array of {role, content} objects", param="messages", code="invalid_type")
    if len(messages) > limits.max_messages:
        raise APIError(f"'messages' has {len(messages)} entries; at most {limits.max_messages}", param="messages", code="invalid_value")
    clean = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise APIError(f"{where} must be an object, got {_json_type(message)}", param=where, code="invalid_type")
        _refuse_unserved_in(message, MESSAGE_FIELDS, where)
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise APIError(f"{where}.role must be one of {sorted(CHAT_ROLES)}, got {role!r}", param=f"{where}.role", code="invalid_value")
        clean.append({"role": "system" if role == "developer" else role, "content": _content(message.get("content"), where)})
    logprobs = _field(body, "logprobs", (bool,), "a boolean", False)
    top = _top_count(body, "top_logprobs")
    if top is not None and not logprobs:
        raise APIError("'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value")
    return ChatRequest(model, clean, _params(body, limits, ("max_tokens", "max_completion_tokens"), (logprobs, top or 0)))


def _content(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise APIError(
                    f"{where}.content[{j}] must be a text part {{\"type\": \"text\", \"text\": ...}}",
                    param=f"{where}.content",
                    code="invalid_type",
                )
            parts.append(part["text"])
        return "".join(parts)
    raise APIError(f"{where}.content must be a string or an array of text parts, got {_json_type(content)}", param=f"{where}.content", code="invalid_type")


def resolve_max_tokens(params: GenerateParams, prompt_tokens: int, limits: Limits) -> int:
    """The token budget for a prompt of this length, or a 400 when prompt + max_tokens do not fit the context."""
    room = limits.context_length - prompt_tokens
    if room < 1:
        raise APIError(
            f"the prompt is {prompt_tokens} tokens; this model's context length is {limits.context_length}",
            code="context_length_exceeded",
        )
    if params.max_tokens is None:
        return min(limits.default_max_tokens, room)
    if params.max_tokens > room:
        raise APIError(
            f"the prompt ({prompt_tokens} tokens) plus {params.max_tokens_field} ({params.max_tokens}) exceed the context length "
            f"{limits.context_length}",
            param=params.max_tokens_field,
            code="context_length_exceeded",
        )
    return params.max_tokens


# -- responses ------------------------------------------------------------------------------------------------


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(result: TextResult) -> dict[str, int]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


@dataclass
class LogprobShaper:
    """Renders tokens' log-probs in the endpoint's OpenAI shape: chat's `{"content": [...]}` entries with bytes and
    top alternatives, or completions' parallel `tokens` / `token_logprobs` / `top_logprobs` / `text_offset` lists.
    `offset` carries completions' text offsets across the chunks of a stream."""

    chat: bool
    token_bytes: TokenBytes
    offset: int = 0

    def render(self, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        return self._chat(logprobs) if self.chat else self._completion(logprobs)

    def _entry(self, token_id: int, logprob: float | None) -> dict[str, Any]:
        raw = self.token_bytes(token_id)
        return {"token": raw.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(raw)}

    def _chat(self, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        content = [{**self._entry(lp.token_id, lp.logprob), "top_logprobs": [self._entry(i, v) for i, v in lp.top]} for lp in logprobs]
        return {"content": content, "refusal": None}

    def _completion(self, logprobs: list[TokenLogprob]) -> dict[str, Any]:
        text = lambda token_id: self.token_bytes(token_id).decode("utf-8", "replace")  # noqa: E731
        tokens, offsets = [], []
        for lp in logprobs:
            tokens.append(text(lp.token_id))
            offsets.append(self.offset)
            self.offset += len(tokens[-1])
        # OpenAI: the alternatives "as well as the chosen token", so up to logprobs + 1 entries
        top = [{**{text(i): v for i, v in lp.top}, text(lp.token_id): lp.logprob} for lp in logprobs]
        return {"tokens": tokens, "token_logprobs": [lp.logprob for lp in logprobs], "top_logprobs": top, "text_offset": offsets}


def logprob_sources(logprobs: list[TokenLogprob]) -> list[str | None]:
    """For the `offramp` field: whose log-prob each token reports (full_model where the cloud decided, exit_head
    where the edge did)."""
    return [lp.source for lp in logprobs]


def completion_object(
    rid: str, model: str, created: int, result: TextResult, offramp: dict[str, Any], logprobs: LogprobShaper | None = None
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "text": result.text, "logprobs": _logprobs(logprobs, result.logprobs), "finish_reason": result.finish_reason}],
        "usage": usage(result),
        "offramp": offramp,
    }


def chat_object(
    rid: str, model: str, created: int, result: TextResult, offramp: dict[str, Any], logprobs: LogprobShaper | None = None
) -> dict[str, Any]:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "logprobs": _logprobs(logprobs, result.logprobs),
                "finish_reason": result.finish_reason,
            }
        ],
        "usage": usage(result),
        "offramp": offramp,
    }


def _logprobs(shaper: LogprobShaper | None, logprobs: list[TokenLogprob]) -> dict[str, Any] | None:
    return shaper.render(logprobs) if shaper is not None else None


@dataclass
class ChunkShaper:
    """Builds the stream's chunks for one request (`chat.completion.chunk` or `text_completion`).

    With `include_usage`, as OpenAI does, every chunk carries `"usage": null` and only the last one, whose
    choices are empty, the counts; without it the finishing chunk carries them (an extension, as `offramp` is).
    A client that adds up every chunk's usage (langchain does) thus counts each token once either way."""

    chat: bool
    rid: str
    model: str
    created: int
    include_usage: bool = False
    logprobs: LogprobShaper | None = None

    @classmethod
    def start(cls, chat: bool, model: str, include_usage: bool = False, logprobs: LogprobShaper | None = None) -> "ChunkShaper":
        return cls(chat, new_id("chatcmpl" if chat else "cmpl"), model, int(time.time()), include_usage, logprobs)

    def _chunk(self, choice: dict[str, Any], **extra: Any) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        usage_field = {"usage": None} if self.include_usage else {}
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.model, "choices": [choice], **usage_field, **extra}

    def first(self) -> dict[str, Any] | None:
        """Chat streams open with the assistant role (OpenAI does); completions have nothing to open with."""
        if not self.chat:
            return None
        return self._chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None})

    def piece(self, delta: TextDelta) -> dict[str, Any]:
        offramp: dict[str, Any] = {"token_ids": delta.token_ids, "sources": delta.sources}
        if self.logprobs is not None:
            offramp["logprob_sources"] = logprob_sources(delta.logprobs)
        logprobs = _logprobs(self.logprobs, delta.logprobs)
        if self.chat:
            return self._chunk({"index": 0, "delta": {"content": delta.text}, "logprobs": logprobs, "finish_reason": None}, offramp=offramp)
        return self._chunk({"index": 0, "text": delta.text, "logprobs": logprobs, "finish_reason": None}, offramp=offramp)

    def final(self, result: TextResult, offramp: dict[str, Any]) -> dict[str, Any]:
        """The finishing chunk: finish_reason, the request's offramp statistics and (without include_usage) usage."""
        if self.chat:
            choice = {"index": 0, "delta": {}, "logprobs": None, "finish_reason": result.finish_reason}
        else:
            choice = {"index": 0, "text": "", "logprobs": None, "finish_reason": result.finish_reason}
        if self.include_usage:
            return self._chunk(choice, offramp=offramp)
        return self._chunk(choice, usage=usage(result), offramp=offramp)

    def usage_only(self, result: TextResult) -> dict[str, Any]:
        """With stream_options.include_usage, OpenAI ends with a chunk whose choices are empty."""
        chunk = self._chunk({}, usage=usage(result))
        chunk["choices"] = []
        return chunk
