"""`--cloud local`: the deep layers in the edge's own process, behind the same `CloudLink` the WebSocket link offers.

The edge finds this module only through the `offramp.cloud_links` entry point named `local` (see
`offramp.edge.link.open_local_link`), so an edge-only install never imports the cloud. Hidden states still go
through the codec, so tokens match what the wire would carry, and byte counts are those of the protocol frames
the WebSocket link would have sent and received for the same calls.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
from concurrent.futures import Executor
from typing import Any

import numpy as np

from offramp.cloud.context import ContextManager
from offramp.cloud.engine import DeepEngine
from offramp.edge.link import LinkStats, LocalLinkSpec
from offramp.shared import protocol as p
from offramp.shared.codecs import get_codec
from offramp.shared.contract import ContextMismatchError, DeepResult, ExtendRequest, StaleRequestError
from offramp.shared.errors import ArtifactError
from offramp.shared.contract import extend_frame, result_frame


class LocalCloudLink:
    """The cloud engine called inline (one request at a time: tests, single-request tools)."""

    def __init__(self, engine: DeepEngine, codec: str = "fp32") -> None:
        self.engine = engine
        self.codec = codec
        self._codec = get_codec(codec)
        self.deep_layers = engine.cloud.num_layers
        self.stats = LinkStats()
        self._ids = itertools.count(1)

    def _count(self, stats: LinkStats | None, up: p.Frame, down: p.Frame) -> None:
        """Count a frame pair as the WebSocket link would: once in the link's totals, once in the request's."""
        sizes = len(p.encode_frame(up)), len(p.encode_frame(down))
        for target in {id(s): s for s in (self.stats, stats) if s is not None}.values():
            target.add_frame(*sizes)
            target.round_trips += 1

    def _open(self, session_id: str, stats: LinkStats | None) -> None:
        rid = next(self._ids)
        ctx = self.engine.contexts.open(session_id, codec=self.codec)
        self._count(stats, p.Open(rid, session_id, self.codec), p.Opened(rid, session_id, ctx.length, ctx.epoch))

    def _close(self, session_id: str, stats: LinkStats | None) -> None:
        rid = next(self._ids)
        self.engine.contexts.close(session_id)
        self._count(stats, p.Close(rid, session_id), p.Closed(rid, session_id))

    def _extend(self, request: ExtendRequest, stats: LinkStats | None) -> DeepResult:
        """The request through the codec and the engine, counted as its frames; a session the engine lost is
        re-opened for the re-upload, as the WebSocket link does."""
        frame = extend_frame(next(self._ids), request, self._codec.encode(np.asarray(request.hidden, dtype=np.float32)))
        decoded = self._codec.decode(frame.payload, request.rows, request.hidden.shape[1])
        try:
            result = self.engine.extend(dataclasses.replace(request, hidden=decoded))
        except ContextMismatchError as exc:
            self._count(stats, frame, p.Evicted(frame.id, request.session_id, exc.have, exc.epoch, exc.reason))
            if exc.have == 0 and request.session_id not in self.engine.contexts:
                self._open(request.session_id, stats)
            raise
        except StaleRequestError as exc:
            self._count(stats, frame, p.Stale(frame.id, request.session_id, exc.epoch, exc.length))
            raise
        self._count(stats, frame, result_frame(frame.id, request.session_id, result))
        return result

    async def open_session(self, session_id: str, stats: LinkStats | None = None) -> None:
        self._open(session_id, stats)

    async def extend(self, request: ExtendRequest, stats: LinkStats | None = None) -> DeepResult:
        return self._extend(request, stats)

    async def close_session(self, session_id: str, stats: LinkStats | None = None) -> None:
        self._close(session_id, stats)

    async def aclose(self) -> None:
        return None


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

    async def open_session(self, session_id: str, stats: LinkStats | None = None) -> None:
        await self._call(self._open, session_id, stats)

    async def close_session(self, session_id: str, stats: LinkStats | None = None) -> None:
        await self._call(self._close, session_id, stats)

    async def extend(self, request: ExtendRequest, stats: LinkStats | None = None) -> DeepResult:
        return await self._call(self._extend, request, stats)


def local_link(model: Any, exit_layer: int, codec: str = "fp32", kv_budget_bytes: int | None = None) -> LocalCloudLink:
    """Layers K..N-1 of a loaded model as an inline link (tests and single-request tools)."""
    from offramp.models.split import CloudPart

    return LocalCloudLink(DeepEngine(CloudPart(model, exit_layer), ContextManager(budget_bytes=kv_budget_bytes)), codec)


def open_local_link(spec: LocalLinkSpec) -> ThreadedLocalLink:
    """The `offramp.cloud_links:local` entry point: load `spec.model` (unless given) and check it is the edge's model."""
    from offramp.models import load_model, model_fingerprint

    model = spec.loaded if spec.loaded is not None else load_model(spec.model)[0]
    fingerprint = model_fingerprint(model)
    if fingerprint != spec.fingerprint:
        raise ArtifactError(
            f"--cloud local loaded model {spec.model!r} (fingerprint {fingerprint[:16]}), but the edge graph is for "
            f"{spec.fingerprint[:16]}: pass the --model the edge directory was exported from"
        )
    inline = local_link(model, spec.exit_layer, spec.codec, spec.kv_budget_bytes)
    return ThreadedLocalLink(inline.engine, spec.codec, spec.executor)
