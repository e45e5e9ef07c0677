"""The edge's text-level service: one model, a pool of per-request runtimes, a shared cloud link, text out.

The daemon (HTTP) and the in-process SDK (`LocalEngine`) both sit on `EdgeService`. It knows prompts as token
ids plus stop strings, and hands back text pieces with the tokens behind them; it knows nothing about HTTP.

Each request gets its own `Generation`: its own edge runtime (a runtime holds one sequence's KV cache) and its
own view of the cloud link (so byte counts are per request even when the link is shared). Edge steps and, with
`--cloud local`, deep-layer steps run in a thread pool, so concurrent requests interleave step by step and the
event loop stays free. Closing a generation (or its client going away) closes its cloud session at once.
"""

from __future__ import annotations

import asyncio
import copy
import os
import threading
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from offramp.cloud.engine import DeepEngine
from offramp.shared.contract import DeepResult, ExtendRequest
from offramp.edge.decode_loop import CollaborativeDecoder, DecodeOptions, GenerationStats
from offramp.edge.link import CloudLink, CloudUnavailableError, LinkStats, LocalCloudLink
from offramp.edge.runtime import EdgeRuntime
from offramp.shared.codecs import CODECS, DEFAULT_CODEC, get_codec
from offramp.shared.errors import OfframpError
from offramp.shared.sampling import SamplingParams

CLOUD_NONE, CLOUD_LOCAL = "none", "local"
# Chat models end a turn with one of these; each that the tokenizer knows as a single token also stops generation.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|endoftext|>")


class ServiceConfigError(OfframpError, ValueError):
    """A service setting (cloud spec, codec, session limit) that cannot work."""


class BusyError(OfframpError):
    """Every session slot is taken; the caller should retry later (HTTP 429)."""


@dataclass(frozen=True)
class EngineConfig:
    """What the edge runs: which model, where it is cut, how it decides, and where the cloud is."""

    model: str = "default"
    exit_layer: int = 15
    precision: str = "torch"  # torch | fp32 | int8 (see offramp.edge.assemble.EDGE_PRECISIONS)
    cloud: str = CLOUD_NONE  # none | local | ws://host:port[/path] | wss://...
    codec: str = DEFAULT_CODEC
    threshold: float | None = None  # exit when confidence >= threshold (> 1 never exits); None: calibrated, else 0.9
    max_sessions: int = 16  # concurrent requests; one more gets BusyError
    workers: int | None = None  # compute threads; None = the machine's cores
    artifacts: Path | None = None  # a trained exit head dir (default: the one `offramp train-exits` wrote, if any)
    cloud_token: str | None = None  # bearer token for a ws:// cloud
    trained_head: bool = True  # use the trained head + calibrated rule when present
    catch_up: str = "lazy"  # lazy | eager (see DecodeOptions)
    lossless: bool = True  # every token confirmed by the cloud before it is sent (False: exit mode)
    max_draft: int = 16  # drafts ahead of the last confirmed token, at most
    fixed_draft: int = 0  # > 0: speculate exactly this deep (benchmarks)
    cloud_timeout_s: float = 10.0  # an escalation unanswered this long falls back to the edge
    verify_tls: bool = True  # wss:// certificates are checked unless this is False
    cloud_ca_file: Path | None = None  # a CA bundle for a wss:// cloud with a private certificate

    def __post_init__(self) -> None:
        if self.codec not in CODECS:
            raise ServiceConfigError(f"unknown codec {self.codec!r}; known: {sorted(CODECS)}")
        if not (self.cloud in (CLOUD_NONE, CLOUD_LOCAL) or self.cloud.startswith(("ws://", "wss://"))):
            raise ServiceConfigError(f"cloud {self.cloud!r} is not 'none', 'local', or a ws:// / wss:// URL")
        if self.max_sessions < 1:
            raise ServiceConfigError(f"max_sessions must be >= 1, got {self.max_sessions}")
        if self.workers is not None and self.workers < 1:
            raise ServiceConfigError(f"workers must be >= 1, got {self.workers}")
        if self.threshold is not None and not np.isfinite(self.threshold):
            raise ServiceConfigError(f"threshold must be a finite number, got {self.threshold!r}")

    @property
    def cloud_kind(self) -> str:
        return self.cloud if self.cloud in (CLOUD_NONE, CLOUD_LOCAL) else "ws"


@dataclass
class TextRequest:
    """One generation, already tokenized and validated."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    seed: int | None = None
    stop: tuple[str, ...] = ()  # cut on text; the stop string itself is not returned


@dataclass
class TextDelta:
    """A piece of text and the tokens decided since the previous piece (text may lag tokens by a character)."""

    text: str
    token_ids: list[int]
    sources: list[str]


@dataclass
class TextResult:
    text: str
    token_ids: list[int]
    sources: list[str]
    finish_reason: str  # "stop" (end of turn or a stop string) | "length" (max_tokens or the context is full)
    prompt_tokens: int
    mode: str  # edge-standalone | collaborative
    stats: GenerationStats

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


class TextAssembler:
    """Token ids in, text out: never splits a multi-byte character, and cuts at the first stop string.

    Decodes a short window of recent tokens rather than the whole sequence (as vLLM does), so a long generation
    costs O(n), and holds back a tail that could still become a stop string.
    """

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self._prefix = 0  # window start
        self._read = 0  # tokens whose text is in self.text
        self.text = ""
        self.emitted = 0  # characters of self.text already handed out
        self.stopped = False  # a stop string was found; nothing more comes out

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _absorb(self, final: bool) -> None:
        window = self.ids[self._prefix :]
        prefix_text = self._decode(self.ids[self._prefix : self._read])
        new_text = self._decode(window)
        if len(new_text) > len(prefix_text) and (final or not new_text.endswith("\ufffd")):
            self.text += new_text[len(prefix_text) :]
            self._prefix, self._read = self._read, len(self.ids)

    def add(self, token_id: int) -> str:
        """Take one token; return the text that is now safe to show (may be empty)."""
        self.ids.append(token_id)
        if self.stopped:
            return ""
        self._absorb(final=False)
        return self._release(final=False)

    def finish(self) -> str:
        """No more tokens: return whatever was held back."""
        if self.stopped:
            return ""
        self._absorb(final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        end = len(self.text)
        if self.stop:
            start = max(0, self.emitted - self._longest_stop + 1)
            hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                cut = min(hits)
                self.stopped = True
                self.text = self.text[:cut]
                end = cut
            elif not final:
                end -= self._held_tail()
        piece = self.text[self.emitted : max(end, self.emitted)]
        self.emitted += len(piece)
        return piece

    def _held_tail(self) -> int:
        """Length of the longest unreleased suffix that is a proper prefix of a stop string."""
        pending = self.text[self.emitted :]
        for size in range(min(len(pending), self._longest_stop - 1), 0, -1):
            tail = pending[-size:]
            if any(s.startswith(tail) for s in self.stop):
                return size
        return 0


class ThreadedLocalLink(LocalCloudLink):
    """The in-process cloud for a server: deep-layer work runs in the thread pool, one call at a time.

    One call at a time because the engine's context table is not thread-safe (and a real cloud would batch).
    """

    def __init__(self, engine: DeepEngine, codec: str, executor: Executor) -> None:
        super().__init__(engine, codec)
        self._executor = executor
        self._lock = threading.Lock()

    async def _call(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._executor, self._locked, fn, *args)

    def _locked(self, fn: Any, *args: Any) -> Any:
        with self._lock:
            return fn(*args)

    async def open_session(self, session_id: str) -> None:
        await self._call(self.engine.contexts.open, session_id, "", self.codec)

    async def close_session(self, session_id: str) -> None:
        await self._call(self.engine.contexts.close, session_id)

    async def extend(self, request: ExtendRequest) -> DeepResult:
        return await self._call(self.run, request)


class RequestLink:
    """One request's view of the shared link: its own byte counts, and it tells the service how the link fares.

    Bytes are counted as the link's payload (the codec's size up; token ids and log-probs down), the same way
    `LocalCloudLink` counts them, so concurrent requests never see each other's traffic.
    """

    def __init__(self, shared: CloudLink, health: "LinkHealth") -> None:
        self.shared = shared
        self.health = health
        self.codec = shared.codec
        self.deep_layers = shared.deep_layers
        self.stats = LinkStats()
        self._codec = get_codec(shared.codec)
        self.sessions: set[str] = set()

    async def open_session(self, session_id: str) -> None:
        await self._guard(self.shared.open_session(session_id))
        self.sessions.add(session_id)

    async def extend(self, request: ExtendRequest) -> DeepResult:
        result = await self._guard(self.shared.extend(request))
        self.stats.bytes_up += self._codec.nbytes(*request.hidden.shape)
        self.stats.bytes_down += 8 * len(result.predicted) + (4 if result.token is not None else 0)
        self.stats.round_trips += 1
        return result

    async def close_session(self, session_id: str) -> None:
        self.sessions.discard(session_id)
        await self._guard(self.shared.close_session(session_id))

    async def aclose(self) -> None:
        return None  # the shared link outlives requests

    async def _guard(self, call: Any) -> Any:
        try:
            result = await call
        except CloudUnavailableError as exc:
            self.health.failed(str(exc))
            raise
        self.health.succeeded()
        return result


@dataclass
class LinkHealth:
    """What the edge last saw of the cloud: `up` after a good call, `down` after CloudUnavailableError."""

    kind: str
    url: str | None = None
    state: str = "unknown"  # disabled | unknown | up | down
    last_error: str | None = None
    last_change: float = field(default_factory=time.time)
    failures: int = 0

    def succeeded(self) -> None:
        if self.state != "up":
            self.state, self.last_change = "up", time.time()

    def failed(self, message: str) -> None:
        self.failures += 1
        self.last_error = message
        if self.state != "down":
            self.state, self.last_change = "down", time.time()

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": self.kind,
            "url": self.url,
            "state": self.state,
            "last_error": self.last_error,
            "failures": self.failures,
            "since": self.last_change,
        }


class RuntimePool:
    """Edge runtimes for concurrent requests: reuse idle ones, create up to `limit`, refuse beyond it."""

    def __init__(self, first: EdgeRuntime, limit: int, factory: Any) -> None:
        self._idle: list[EdgeRuntime] = [first]
        self._factory = factory
        self.limit = limit
        self.active = 0

    def acquire(self) -> EdgeRuntime:
        if self.active >= self.limit:
            raise BusyError(f"all {self.limit} edge sessions are busy; retry shortly")
        runtime = self._idle.pop() if self._idle else self._factory()
        self.active += 1
        return runtime

    def release(self, runtime: EdgeRuntime, reusable: bool) -> None:
        """A runtime that may still be running in a worker thread (a cancelled step) is dropped, not reused."""
        self.active -= 1
        if reusable:
            self._idle.append(runtime)


class EdgeService:
    """Model + tokenizer + runtime pool + cloud link: what a daemon or an embedded app generates with."""

    def __init__(self, model: Any, tokenizer: Any, config: EngineConfig, link: CloudLink | None = None) -> None:
        """Build from a loaded model. `link` overrides the one `config.cloud` names (tests inject faulty links)."""
        from offramp.edge.assemble import build_edge_runtime, build_local_link

        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.total_layers = model.config.num_hidden_layers
        self.max_positions = int(model.config.max_position_embeddings)
        self.vocab_size = int(model.config.vocab_size)
        self.executor = ThreadPoolExecutor(config.workers or os.cpu_count() or 1, thread_name_prefix="offramp-edge")
        from offramp.edge.exit_setup import resolve_exit_setup

        self.exit_setup = resolve_exit_setup(model, config.exit_layer, config.artifacts, config.trained_head, config.threshold)
        self.threshold = self.exit_setup.threshold
        first = build_edge_runtime(model, config.exit_layer, config.precision, config.model, head_dir=self.exit_setup.head_dir)
        self.runtime_manifest = getattr(first, "manifest", None)
        self.pool = RuntimePool(first, config.max_sessions, lambda: self._new_runtime(first))
        self.confidence = self.exit_setup.rule.confidence
        self.health = LinkHealth(config.cloud_kind, config.cloud if config.cloud_kind == "ws" else None)
        if link is not None:
            self.link: CloudLink | None = link
        elif config.cloud == CLOUD_NONE:
            self.link = None
            self.health.state = "disabled"
        elif config.cloud == CLOUD_LOCAL:
            local = build_local_link(model, config.exit_layer, config.codec)
            self.link = ThreadedLocalLink(local.engine, config.codec, self.executor)
            self.health.state = "up"
        else:
            self.link = self._ws_link(config)
        self.stop_ids = self._stop_ids(tokenizer)
        self.closed = False

    @classmethod
    def load(cls, config: EngineConfig) -> "EdgeService":
        """Load the model named by `config.model` and build the service around it."""
        from offramp.models import load_model

        model, tokenizer = load_model(config.model)
        return cls(model, tokenizer, config)

    def _new_runtime(self, first: EdgeRuntime) -> EdgeRuntime:
        """Another runtime sharing the first one's weights (torch) or inference session (ONNX); only KV is per request."""
        from offramp.edge.assemble import build_edge_runtime
        from offramp.edge.torch_runtime import TorchEdgeRuntime

        if isinstance(first, TorchEdgeRuntime):
            return TorchEdgeRuntime(first.edge, first.manifest)
        if type(first).__name__ == "OnnxEdgeRuntime":  # an ORT session runs concurrent calls safely
            clone = copy.copy(first)
            clone.reset()  # fresh KV buffers: reset() rebinds them, so nothing is shared with `first`
            return clone
        return build_edge_runtime(
            self.model, self.config.exit_layer, self.config.precision, self.config.model, head_dir=self.exit_setup.head_dir
        )

    def _ws_link(self, config: EngineConfig) -> CloudLink:
        try:
            from offramp.edge.ws_link import WebSocketCloudLink
        except ModuleNotFoundError as exc:
            raise ServiceConfigError(f"cloud {config.cloud!r} needs offramp.edge.ws_link, which is not installed") from exc
        kwargs: dict[str, Any] = {
            "codec": config.codec, "manifest": self.runtime_manifest, "timeout_s": config.cloud_timeout_s,
            "verify_tls": config.verify_tls, "ca_file": str(config.cloud_ca_file) if config.cloud_ca_file else None,
        }
        if config.cloud_token is not None:
            kwargs["token"] = config.cloud_token
        return WebSocketCloudLink(config.cloud, **kwargs)

    @staticmethod
    def _stop_ids(tokenizer: Any) -> tuple[int, ...]:
        ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        vocab = tokenizer.get_vocab()
        ids.update(vocab[t] for t in END_OF_TURN_TOKENS if t in vocab)
        return tuple(sorted(ids))

    @property
    def mode(self) -> str:
        return "collaborative" if self.link is not None else "edge-standalone"

    # -- prompts --------------------------------------------------------------------------------------------

    def encode_text(self, prompt: str) -> list[int]:
        """A completion prompt: plain text with the tokenizer's special tokens (BOS where the model has one)."""
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Messages through the model's chat template, ending with the assistant's generation prompt."""
        ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    async def run_in_pool(self, fn: Any, *args: Any) -> Any:
        """Run a blocking call (tokenizing a big prompt, say) in the compute pool."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    # -- generation ----------------------------------------------------------------------------------------

    def generate(self, request: TextRequest) -> "Generation":
        """Start one generation; raises BusyError when every session slot is taken."""
        if self.closed:
            raise BusyError("the edge service is shutting down")
        return Generation(self, request)

    def describe(self) -> dict[str, Any]:
        """Edge state for /healthz."""
        return {
            "model": self.config.model,
            "exit_layer": self.config.exit_layer,
            "precision": self.config.precision,
            "threshold": self.threshold,
            "exit_rule": self.exit_setup.describe(),
            "catch_up": self.config.catch_up,
            "lossless": self.config.lossless,
            "max_draft": self.config.max_draft,
            "codec": self.config.codec,
            "mode": self.mode,
            "sessions_active": self.pool.active,
            "sessions_max": self.pool.limit,
            "context_length": self.max_positions,
        }

    def link_state(self) -> dict[str, Any]:
        """Cloud link state for /healthz: what requests last saw, plus the link's own view when it has one."""
        state = self.health.to_dict()
        for attr in ("state", "connected"):
            value = getattr(self.link, attr, None)
            if isinstance(value, (str, bool)):
                state[f"link_{attr}"] = value
        return state

    async def aclose(self) -> None:
        """Close the cloud link and the thread pool (in-flight generations should be finished or closed first)."""
        if self.closed:
            return
        self.closed = True
        if self.link is not None:
            try:
                await self.link.aclose()
            except Exception:  # noqa: BLE001 - a dead link must not stop a shutdown
                pass
        self.executor.shutdown(wait=False, cancel_futures=True)


class Generation:
    """One request's decode: iterate once for `TextDelta`s; `result` is set when iteration ends; always `aclose()`."""

    def __init__(self, service: EdgeService, request: TextRequest) -> None:
        self.service = service
        self.request = request
        self.runtime = service.pool.acquire()
        self.link = RequestLink(service.link, service.health) if service.link is not None else None
        self.decoder = CollaborativeDecoder(
            self.runtime, self.link, service.total_layers, service.confidence, executor=service.executor
        )
        self.assembler = TextAssembler(service.tokenizer, request.stop)
        self.result: TextResult | None = None
        self._events: Any = None  # the decoder's async generator
        self._iter: Any = None  # ours
        self._released = False
        self._dirty = False  # an edge step may still be running in a worker thread: do not reuse the runtime

    def __aiter__(self) -> AsyncIterator[TextDelta]:
        if self._iter is not None:
            raise RuntimeError("a Generation can be iterated once")
        self._iter = self._run()
        return self._iter

    async def _run(self) -> AsyncIterator[TextDelta]:
        req, service = self.request, self.service
        cfg = service.config
        options = DecodeOptions(req.max_tokens, service.threshold, req.sampling, req.seed, service.stop_ids,
                                catch_up=cfg.catch_up, lossless=cfg.lossless, max_draft=cfg.max_draft, fixed_draft=cfg.fixed_draft)
        self._events = self.decoder.stream(req.prompt_ids, options)
        token_ids: list[int] = []
        sources: list[str] = []
        pending_ids: list[int] = []
        pending_sources: list[str] = []
        finish = "length"
        try:
            async for event in self._events:
                token_ids.append(event.token_id)
                sources.append(event.source)
                pending_ids.append(event.token_id)
                pending_sources.append(event.source)
                piece = self.assembler.add(event.token_id)
                if event.token_id in service.stop_ids or self.assembler.stopped:
                    finish = "stop"
                if self.assembler.stopped:
                    break
                if piece:
                    yield TextDelta(piece, pending_ids, pending_sources)
                    pending_ids, pending_sources = [], []
            await self._events.aclose()  # runs the decoder's finally: stats complete, cloud session closed
            tail = self.assembler.finish()
            self.result = TextResult(
                self.assembler.text, token_ids, sources, finish, len(req.prompt_ids), self.decoder.mode, self.decoder.stats
            )
            if tail or pending_ids:
                yield TextDelta(tail, pending_ids, pending_sources)
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

    async def aclose(self) -> None:
        """Stop decoding, close the cloud session, give the runtime back. Safe to call more than once."""
        if self._iter is not None:
            await self._iter.aclose()
        await self._cleanup()
