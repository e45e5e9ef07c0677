"""Python clients for a running edge daemon (`offramp edge serve`): `Client` (sync) and `AsyncClient`.

Both speak the daemon's OpenAI-compatible API and return a `Completion` with the text plus where each token was
decided (edge, cloud, edge-fallback) and the request's statistics.

    >>> from offramp.edge import Client
    >>> client = Client("http://127.0.0.1:8710")
    >>> done = client.generate("What is gravity?", chat=True, max_tokens=32)
    >>> print(done.text, done.stats["edge_exits"], done.sources[:3])
    >>> for piece in client.stream("Write a haiku about rain.", chat=True):
    ...     print(piece, end="", flush=True)

The sync client uses only the standard library; the async one uses aiohttp:

    >>> async with AsyncClient("http://127.0.0.1:8710") as client:
    ...     async for piece in client.stream("Hello", chat=True):
    ...         print(piece, end="")
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypedDict

from offramp.shared.errors import OfframpError

if TYPE_CHECKING:
    from typing_extensions import Unpack

DEFAULT_URL = "http://127.0.0.1:8710"
Prompt = str | Sequence[dict[str, Any]]


class ClientError(OfframpError):
    """The daemon refused the request or failed; carries the OpenAI-style error fields."""

    def __init__(self, message: str, status: int | None = None, type: str | None = None, code: str | None = None, param: str | None = None) -> None:
        super().__init__(f"{message} (HTTP {status}, {code})" if status else message)
        self.message, self.status, self.type, self.code, self.param = message, status, type, code, param

    @classmethod
    def from_body(cls, status: int, raw: bytes) -> "ClientError":
        try:
            err = json.loads(raw)["error"]
            return cls(err.get("message", ""), status, err.get("type"), err.get("code"), err.get("param"))
        except (ValueError, KeyError, TypeError):
            return cls(raw[:200].decode("utf-8", "replace") or "no body", status)


@dataclass
class Completion:
    """One generation's result: text, tokens, where each token was decided, and the offramp statistics."""

    text: str
    finish_reason: str | None = None  # "stop" | "length"
    token_ids: list[int] | None = None
    sources: list[str] = field(default_factory=list)  # per token: edge | cloud | edge-fallback
    stats: dict[str, Any] = field(default_factory=dict)  # edge_exits, escalations, fallback_tokens, bytes_up, ...
    usage: dict[str, int] = field(default_factory=dict)
    mode: str | None = None  # edge-standalone | collaborative

    @classmethod
    def from_response(cls, obj: dict[str, Any]) -> "Completion":
        choice = obj["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        return cls._with_offramp(text or "", choice.get("finish_reason"), obj.get("usage") or {}, obj.get("offramp") or {})

    @classmethod
    def _with_offramp(cls, text: str, finish: str | None, usage: dict[str, int], offramp: dict[str, Any]) -> "Completion":
        stats = {k: v for k, v in offramp.items() if k not in ("sources", "token_ids", "mode")}
        return cls(text, finish, offramp.get("token_ids"), list(offramp.get("sources") or []), stats, dict(usage), offramp.get("mode"))


class GenerateOptions(TypedDict, total=False):
    """What every SDK call takes besides the prompt, with OpenAI's names and meanings.

    chat (False): send the prompt through the model's chat template (a string or a list of messages);
    max_tokens (the daemon's default; 64 in-process); temperature (0.0: greedy); top_p (1.0); stop (a string or
    several); seed (for reproducible sampling); system (a system message, with chat=True).
    """

    chat: bool
    max_tokens: int | None
    temperature: float
    top_p: float
    stop: str | Sequence[str] | None
    seed: int | None
    system: str | None


def chat_messages(prompt: Prompt, system: str | None) -> list[dict[str, Any]]:
    """A string becomes one user message; a system message goes first."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return messages


def completion_prompt(prompt: Prompt) -> str:
    if not isinstance(prompt, str):
        raise TypeError(f"a completion prompt must be a string (pass chat=True for messages), got {type(prompt).__name__}")
    return prompt


def request_body(
    prompt: Prompt,
    *,
    model: str | None,
    stream: bool,
    chat: bool = False,
    max_tokens: int | None = None,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: str | Sequence[str] | None = None,
    seed: int | None = None,
    system: str | None = None,
) -> tuple[str, dict[str, Any]]:
    """(path, JSON body) for a prompt: chat sends messages, else a completion."""
    body: dict[str, Any] = {"temperature": temperature, "top_p": top_p, "stream": stream}
    if model is not None:
        body["model"] = model
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if stop is not None:
        body["stop"] = [stop] if isinstance(stop, str) else list(stop)
    if seed is not None:
        body["seed"] = seed
    if chat:
        body["messages"] = chat_messages(prompt, system)
        return "/v1/chat/completions", body
    body["prompt"] = completion_prompt(prompt)
    return "/v1/completions", body


class _StreamState:
    """Folds SSE chunks into text pieces and, at the end, a Completion."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.completion: Completion | None = None
        self._finish: str | None = None
        self._usage: dict[str, int] = {}
        self._offramp: dict[str, Any] = {}

    def feed(self, line: str) -> str | None:
        """One SSE line in; the text piece it carries (None for none). Raises ClientError on an in-band error."""
        if not line.startswith("data:"):
            return None
        data = line[5:].strip()
        if data == "[DONE]":
            self.completion = Completion._with_offramp("".join(self.parts), self._finish, self._usage, self._offramp)
            return None
        chunk = json.loads(data)
        if "error" in chunk:
            err = chunk["error"]
            raise ClientError(err.get("message", "stream failed"), None, err.get("type"), err.get("code"), err.get("param"))
        if chunk.get("usage"):
            self._usage = chunk["usage"]
        if chunk.get("choices"):
            choice = chunk["choices"][0]
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
                self._offramp = chunk.get("offramp") or {}
            piece = choice["delta"].get("content") if "delta" in choice else choice.get("text")
            if piece:
                self.parts.append(piece)
                return piece
        return None


class TextStream:
    """Text pieces as they are generated (iterate it); `completion` holds the whole result once it is exhausted."""

    def __init__(self, lines: Iterable[bytes], closer: Any) -> None:
        self._lines = lines
        self._closer = closer
        self._state = _StreamState()

    @property
    def completion(self) -> Completion | None:
        return self._state.completion

    def __iter__(self) -> Iterator[str]:
        try:
            for raw in self._lines:
                piece = self._state.feed(raw.decode("utf-8"))
                if piece:
                    yield piece
                if self._state.completion is not None:
                    return
        finally:
            self.close()

    def close(self) -> None:
        """Stop early: the daemon notices the closed connection and frees the session."""
        self._closer()

    def __enter__(self) -> "TextStream":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Client:
    """A blocking client for the edge daemon (standard library only).

    >>> client = Client("http://127.0.0.1:8710", token=None, timeout=120)
    >>> client.generate("The capital of France is", max_tokens=8).text
    ' Paris.'
    """

    def __init__(self, base_url: str = DEFAULT_URL, *, token: str | None = None, model: str | None = None, timeout: float = 300.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.model = model
        self.timeout = timeout

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json, text/event-stream"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _open(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url + path, data=data, method=method, headers=self._headers())
        try:
            return urllib.request.urlopen(req, timeout=self.timeout)
        except urllib.error.HTTPError as exc:
            raise ClientError.from_body(exc.code, exc.read()) from None
        except urllib.error.URLError as exc:
            raise ClientError(f"cannot reach the edge daemon at {self.base_url}: {exc.reason}") from None

    def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        with self._open(method, path, body) as resp:
            return json.loads(resp.read())

    def health(self) -> dict[str, Any]:
        """The daemon's /healthz: edge state and cloud link state."""
        return self._json("GET", "/healthz")

    def models(self) -> list[str]:
        return [m["id"] for m in self._json("GET", "/v1/models")["data"]]

    def generate(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Completion:
        """Generate to the end; `options` are `GenerateOptions` (chat=True uses the model's chat template)."""
        path, body = request_body(prompt, model=self.model, stream=False, **options)
        return Completion.from_response(self._json("POST", path, body))

    def stream(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> TextStream:
        """Text pieces as they are decided; the returned stream's `completion` has the statistics at the end."""
        path, body = request_body(prompt, model=self.model, stream=True, **options)
        resp = self._open("POST", path, body)
        return TextStream(resp, resp.close)


class AsyncTextStream:
    """`async for piece in stream`; `completion` once exhausted; `await stream.aclose()` to stop early."""

    def __init__(self, opener: Any) -> None:
        self._opener = opener
        self._response: Any = None
        self._state = _StreamState()

    @property
    def completion(self) -> Completion | None:
        return self._state.completion

    async def __aiter__(self) -> AsyncIterator[str]:
        self._response = await self._opener()
        try:
            async for raw in self._response.content:
                piece = self._state.feed(raw.decode("utf-8"))
                if piece:
                    yield piece
                if self._state.completion is not None:
                    return
        finally:
            await self.aclose()

    async def aclose(self) -> None:
        if self._response is not None:
            self._response.close()


class AsyncClient:
    """An asyncio client for the edge daemon (aiohttp). Use `async with`, or call `aclose()`.

    >>> async with AsyncClient("http://127.0.0.1:8710") as client:
    ...     done = await client.generate("What is gravity?", chat=True, max_tokens=32)
    ...     async for piece in client.stream("Tell me a joke", chat=True):
    ...         print(piece, end="")
    """

    def __init__(self, base_url: str = DEFAULT_URL, *, token: str | None = None, model: str | None = None, timeout: float = 300.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.model = model
        self.timeout = timeout
        self._session: Any = None

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _http(self) -> Any:
        import aiohttp

        if self._session is None:
            headers = {"Accept": "application/json, text/event-stream"}
            if self.token:
                headers["Authorization"] = f"Bearer {self.token}"
            self._session = aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self._session

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        import aiohttp

        try:
            resp = await self._http().request(method, self.base_url + path, json=body)
        except aiohttp.ClientConnectionError as exc:
            raise ClientError(f"cannot reach the edge daemon at {self.base_url}: {exc}") from None
        if resp.status >= 400:
            raw = await resp.read()
            resp.release()
            raise ClientError.from_body(resp.status, raw)
        return resp

    async def _json(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        resp = await self._request(method, path, body)
        async with resp:
            return await resp.json()

    async def health(self) -> dict[str, Any]:
        return await self._json("GET", "/healthz")

    async def models(self) -> list[str]:
        return [m["id"] for m in (await self._json("GET", "/v1/models"))["data"]]

    async def generate(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Completion:
        """See `Client.generate`."""
        path, body = request_body(prompt, model=self.model, stream=False, **options)
        return Completion.from_response(await self._json("POST", path, body))

    def stream(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> AsyncTextStream:
        """`async for piece in client.stream(...)`: text pieces as they are decided."""
        path, body = request_body(prompt, model=self.model, stream=True, **options)
        return AsyncTextStream(lambda: self._request("POST", path, body))
