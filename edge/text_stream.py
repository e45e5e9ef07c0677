"""One request at the text level: prompt ids in, text pieces out, with the tokens and sources behind them.

`TextStream` takes a runtime from the service's pool and a `RequestLink` on the shared cloud link, runs the
decode loop (`CollaborativeDecoder`) with the service's stop ids and decode options, and turns tokens into text
with the incremental `TextAssembler`. Iterate it once; `result` is set when iteration ends; always `aclose()`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from offramp.edge.decode_loop import CollaborativeDecoder, DecodeOptions, GenerationStats, TokenEvent
from offramp.edge.request_link import RequestLink
from offramp.edge.text import TextAssembler
from offramp.shared.sampling import SamplingParams

if TYPE_CHECKING:
    from offramp.edge.service import EdgeService


@dataclass
class TextRequest:
    """One generation, already tokenized and validated."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: tuple[str, ...] = ()  # cut on text; the stop string itself is not returned
    top_logprobs: int = 0  # alternatives per token to report (the cloud's where it decided)


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-prob and best alternatives (token id, log-prob), and whose they are: the full
    model's (FULL_MODEL, where the cloud decided) or the exit head's (EXIT_HEAD, where the edge did)."""

    token_id: int
    logprob: float | None
    top: list[tuple[int, float]]
    source: str | None

    @classmethod
    def of(cls, event: TokenEvent) -> "TokenLogprob":
        return cls(event.token_id, event.logprob, event.top_logprobs or [], event.logprob_source)


@dataclass
class TextDelta:
    """A piece of text and the tokens decided since the previous piece (text may lag tokens by a character)."""

    text: str
    token_ids: list[int]
    sources: list[str]
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token id


@dataclass
class TextResult:
    text: str
    token_ids: list[int]
    sources: list[str]
    finish_reason: str  # "stop" (end of turn or a stop string) | "length" (max_tokens or the context is full)
    prompt_tokens: int
    mode: str  # edge-standalone | collaborative
    stats: GenerationStats
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token id

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    def offramp_fields(self, exit_layer: int, threshold: float) -> dict[str, Any]:
        """The per-response statistics the API adds under `offramp`."""
        return {
            "mode": self.mode,
            "exit_layer": exit_layer,
            "threshold": threshold,
            **self.stats.to_dict(),
            "sources": self.sources,
            "token_ids": self.token_ids,
        }


class TextStream:
    """One request's decode: iterate once for `TextDelta`s; `result` is set when iteration ends; always `aclose()`."""

    def __init__(self, service: "EdgeService", request: TextRequest) -> None:
        self.service = service
        self.request = request
        self.runtime = service.pool.acquire()
        self.link = RequestLink(service.link, service.health) if service.link is not None else None
        self.decoder = CollaborativeDecoder(
            service.instrument_runtime(self.runtime), self.link, service.total_layers, service.confidence, executor=service.executor
        )
        self.assembler = TextAssembler(service.tokenizer, request.stop)
        self.result: TextResult | None = None
        self._events: Any = None  # the decoder's async generator
        self._iter: Any = None  # ours
        self._released = False
        self._dirty = False  # an edge step may still be running in a worker thread: do not reuse the runtime

    def __aiter__(self) -> AsyncIterator[TextDelta]:
        if self._iter is not None:
            raise RuntimeError("a TextStream can be iterated once")
        self._iter = self._run()
        return self._iter

    async def _run(self) -> AsyncIterator[TextDelta]:
        req, service = self.request, self.service
        self._events = self.decoder.stream(req.prompt_ids, service.decode_options(req))
        done = TextDelta("", [], [])  # every token so far
        pending = TextDelta("", [], [])  # the tokens since the last piece of text
        finish = "length"
        try:
            async for event in self._events:
                for delta in (done, pending):
                    delta.token_ids.append(event.token_id)
                    delta.sources.append(event.source)
                    delta.logprobs.append(TokenLogprob.of(event))
                piece = self.assembler.add(event.token_id)
                if event.token_id in service.stop_ids or self.assembler.stopped:
                    finish = "stop"
                if self.assembler.stopped:
                    break
                if piece:
                    yield TextDelta(piece, pending.token_ids, pending.sources, pending.logprobs)
                    pending = TextDelta("", [], [])
            await self._events.aclose()  # runs the decoder's finally: stats complete, cloud session closed
            tail = self.assembler.finish()
            self.result = TextResult(
                self.assembler.text, done.token_ids, done.sources, finish, len(req.prompt_ids), self.decoder.mode,
                self.decoder.stats, done.logprobs,
            )
            if tail or pending.token_ids:
                yield TextDelta(tail, pending.token_ids, pending.sources, pending.logprobs)
        except GeneratorExit:
            raise
        except BaseException:
            self._dirty = True
            raise
        finally:
            await self._cleanup()

    async def _cleanup(self) -> None:
        if self._released:
            return
        self._released = True
        try:
            if self._events is not None:
                await self._events.aclose()
        finally:
            self.service.pool.release(self.runtime, reusable=not self._dirty)

    async def collect(self) -> TextResult:
        """Run to the end and return the result (for callers that do not stream)."""
        try:
            async for _ in self:
                pass
        finally:
            await self.aclose()
        assert self.result is not None
        return self.result

    async def aclose(self) -> None:
        """Stop decoding, close the cloud session, give the runtime back. Safe to call more than once."""
        if self._iter is not None:
            await self._iter.aclose()
        await self._cleanup()
