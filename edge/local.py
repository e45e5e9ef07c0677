"""`LocalEngine`: the edge runtime (and optionally the cloud) inside your process, for apps that want no daemon.

Same engine as the daemon (`EdgeService`), same results, same `Completion`:

    >>> from offramp.edge import LocalEngine
    >>> with LocalEngine(edge="edge-k15", cloud="ws://gpu-box:8700") as engine:   # an exported edge directory
    ...     done = engine.generate("What is gravity?", chat=True, max_tokens=32)
    ...     print(done.text, done.stats["escalations"])
    ...     for piece in engine.stream("Write a haiku about rain.", chat=True):
    ...         print(piece, end="", flush=True)

`edge` is a directory `offramp export --out DIR` wrote (no torch needed); without it `model` ('default', a
checkpoint dir, a .gguf; the cloud extra) is exported into the cache first. `cloud` is "none"
(edge-standalone), "local" (deep layers in this process; the cloud extra) or a ws:// URL of `offramp cloud
serve`, whose token is `cloud_token` (else $OFFRAMP_CLOUD_TOKEN, else $OFFRAMP_TOKEN). The engine runs its own
event loop on a background thread, so the sync methods work anywhere and the async ones (`agenerate`,
`astream`) work from any loop.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from offramp.edge.client import Completion, GenerateOptions, Prompt, chat_messages, completion_prompt
from offramp.edge.config import EdgeConfig
from offramp.edge.service import EdgeService
from offramp.edge.text_stream import TextRequest, TextResult
from offramp.shared.codecs import DEFAULT_CODEC
from offramp.shared.sampling import SamplingParams

if TYPE_CHECKING:
    from typing_extensions import Unpack

DEFAULT_MAX_TOKENS = 64


def completion_from_result(result: TextResult, exit_layer: int, threshold: float) -> Completion:
    """The SDK's Completion for a finished generation (what the daemon's response would carry)."""
    offramp = result.offramp_fields(exit_layer, threshold)
    usage = {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }
    return Completion._with_offramp(result.text, result.finish_reason, usage, offramp)


def _unpack(stream: "LocalStream | AsyncLocalStream", item: tuple[str, Any]) -> str | None:
    """One item from the engine's loop: a text piece, or None at the end (the completion is stored); errors raise."""
    kind, value = item
    if kind == "piece":
        return value
    if kind == "done":
        stream.completion = value
        return None
    raise value


class LocalStream:
    """Text pieces from an in-process generation; `completion` once exhausted; `close()` to stop early."""

    def __init__(self, items: "queue.Queue[Any]", cancel: threading.Event) -> None:
        self._items = items
        self._cancel = cancel
        self.completion: Completion | None = None

    def __iter__(self) -> Iterator[str]:
        try:
            while (piece := _unpack(self, self._items.get())) is not None:
                yield piece
        finally:
            self._cancel.set()

    def close(self) -> None:
        self._cancel.set()


class AsyncLocalStream:
    """`async for piece in engine.astream(...)`; `completion` once exhausted."""

    def __init__(self, start: Any) -> None:
        self._start = start
        self.completion: Completion | None = None

    async def __aiter__(self) -> AsyncIterator[str]:
        items: asyncio.Queue[Any] = asyncio.Queue()
        loop = asyncio.get_running_loop()
        cancel = threading.Event()
        self._start(lambda item: loop.call_soon_threadsafe(items.put_nowait, item), cancel)
        try:
            while (piece := _unpack(self, await items.get())) is not None:
                yield piece
        finally:
            cancel.set()


class LocalEngine:
    """Edge runtime + optional cloud in this process. Close it (or use `with`) to free the model and the link.

    >>> engine = LocalEngine(edge="edge-k15", cloud="none", threshold=0.9)
    >>> engine.generate("The capital of France is", max_tokens=8).sources
    ['edge', 'edge', ...]
    >>> engine.close()
    """

    def __init__(
        self,
        model: str = "default",
        *,
        edge: str | Path | None = None,
        exit_layer: int | None = None,
        early_exits: Sequence[int] | None = None,
        cloud: str = "none",
        precision: str = "auto",
        threshold: float | None = None,
        codec: str = DEFAULT_CODEC,
        cloud_token: str | None = None,
        head: str | Path | None = None,
        trained_head: bool = True,
        cloud_timeout_s: float = 10.0,
        verify_tls: bool = True,
        max_sessions: int = 4,
        loaded: tuple[Any, Any] | None = None,
    ) -> None:
        """`loaded=(model, tokenizer)` reuses weights already in memory for `model` (export, `cloud="local"`).

        Like `offramp generate`: the edge directory's calibrated rule and threshold are used when it has them; with
        `model`, the trained head `offramp train-exits` left for it and K is exported (`head` names another head
        dir, `trained_head=False` keeps the untrained final-norm head); an explicit `threshold` wins. `early_exits`
        (exits before `exit_layer`, e.g. (8,) for exits at 8 and 15) runs a multi-exit edge, as `--exit-layers 8 15`.
        """
        self.config = EdgeConfig(
            edge=Path(edge) if edge is not None else None, model=model, exit_layer=exit_layer, precision=precision,
            early_exits=tuple(early_exits) if early_exits is not None else None,
            cloud=cloud, codec=codec, threshold=threshold, max_sessions=max_sessions,
            head=Path(head) if head is not None else None, cloud_token=cloud_token,
            trained_head=trained_head, cloud_timeout_s=cloud_timeout_s, verify_tls=verify_tls,
        )
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="offramp-local-engine", daemon=True)
        self._thread.start()
        try:
            self.service: EdgeService = self._call(self._build(loaded))
        except BaseException:
            self._stop_loop()
            raise

    async def _build(self, loaded: tuple[Any, Any] | None) -> EdgeService:
        service = await asyncio.to_thread(EdgeService.open, self.config, loaded=loaded, progress=False)
        try:
            await service.check_cloud()  # a refusing cloud fails here, with its message
        except BaseException:
            await service.aclose()
            raise
        return service

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def tokenizer(self) -> Any:
        return self.service.tokenizer

    @property
    def exit_rule(self) -> dict[str, Any]:
        """Which head, rule and threshold (and where the threshold came from) this engine exits with."""
        return self.service.exit_setup.describe()

    def _request(self, prompt: Prompt, options: GenerateOptions) -> TextRequest:
        unknown = set(options) - set(GenerateOptions.__annotations__)
        if unknown:
            raise TypeError(f"unknown generation options {sorted(unknown)}; known: {sorted(GenerateOptions.__annotations__)}")
        if options.get("chat", False):
            ids = self.service.encode_chat(chat_messages(prompt, options.get("system")))
        else:
            ids = self.service.encode_text(completion_prompt(prompt))
        if not ids:
            raise ValueError("the prompt encodes to no tokens")
        room = self.service.max_positions - len(ids)
        if room < 1:
            raise ValueError(f"the prompt is {len(ids)} tokens; the context length is {self.service.max_positions}")
        max_tokens = options.get("max_tokens")
        max_tokens = DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        stop = options.get("stop")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        sampling = SamplingParams(options.get("temperature", 0.0), options.get("top_p", 1.0))
        return TextRequest(ids, min(max_tokens, room), sampling, options.get("seed"), stops)

    def _start(self, request: TextRequest, put: Any, cancel: threading.Event) -> None:
        """Run one generation on the engine's loop, pushing ("piece", str) / ("done", Completion) / ("error", exc)."""

        async def pump() -> None:
            try:
                generation = self.service.generate(request)
            except BaseException as exc:  # noqa: BLE001 - handed to the consumer
                put(("error", exc))
                return
            try:
                async for delta in generation:
                    if cancel.is_set():
                        break
                    if delta.text:
                        put(("piece", delta.text))
                await generation.aclose()
                if generation.result is not None:
                    put(("done", completion_from_result(generation.result, self.service.exit_layer, self.service.threshold)))
            except BaseException as exc:  # noqa: BLE001
                put(("error", exc))
            finally:
                await generation.aclose()

        asyncio.run_coroutine_threadsafe(pump(), self._loop)

    def generate(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Completion:
        """Generate to the end (blocking). Same arguments and result as `Client.generate`."""
        stream = self.stream(prompt, **options)
        for _ in stream:
            pass
        assert stream.completion is not None
        return stream.completion

    def stream(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> LocalStream:
        """Text pieces as they are decided (blocking iterator)."""
        request = self._request(prompt, options)
        items: queue.Queue[Any] = queue.Queue()
        cancel = threading.Event()
        self._start(request, items.put, cancel)
        return LocalStream(items, cancel)

    async def agenerate(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> Completion:
        """`generate` for asyncio code (any loop)."""
        stream = self.astream(prompt, **options)
        async for _ in stream:
            pass
        assert stream.completion is not None
        return stream.completion

    def astream(self, prompt: Prompt, **options: Unpack[GenerateOptions]) -> AsyncLocalStream:
        """`async for piece in engine.astream(...)`."""
        request = self._request(prompt, options)
        return AsyncLocalStream(lambda put, cancel: self._start(request, put, cancel))

    def close(self) -> None:
        """Close the cloud link and stop the engine's loop."""
        if self._loop.is_closed():
            return
        try:
            self._call(self.service.aclose())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> "LocalEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
