"""Gather escalations from many sessions into one batched forward pass of the deep layers.

Requests wait in a queue; one worker takes everything pending (after a short window for stragglers while
several sessions are batching, none for a lone one, whose every round trip it would lengthen; up to
`max_batch`), runs `DeepEngine.extend_batch` on the engine's worker thread, and answers each waiter. Under
load the next batch fills while the current one runs, so batching needs no tuning to happen.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import Executor

from offramp.cloud.engine import DeepEngine
from offramp.shared.contract import DeepResult, ExtendRequest


class Batcher:
    def __init__(self, engine: DeepEngine, max_batch: int = 32, window_s: float = 0.002, executor: Executor | None = None) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.engine = engine
        self.max_batch = max_batch
        self.window_s = window_s
        self.executor = executor
        self.on_batch: Callable[[int, float], None] | None = None  # (batch size, seconds) after each forward
        self._queue: list[tuple[ExtendRequest, asyncio.Future]] = []
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self._closed = False
        self._last_size = 0  # requests in the last batch: a lone session (a single edge) never waits for company

    @property
    def pending(self) -> int:
        return len(self._queue)

    async def submit(self, req: ExtendRequest) -> DeepResult:
        """The request's result; raises its SessionError. Cancelling the waiter does not undo the request."""
        if self._closed:
            raise RuntimeError("the batcher is closed")
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        self._queue.append((req, future))
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._closed:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._queue and not self._closed:
                if len(self._queue) < self.max_batch and self.window_s > 0 and self._last_size > 1:
                    await asyncio.sleep(self.window_s)  # others were batching lately: give stragglers a moment
                batch, self._queue = self._queue[: self.max_batch], self._queue[self.max_batch :]
                self._last_size = len(batch)
                started = time.perf_counter()
                try:
                    results = await loop.run_in_executor(self.executor, self.engine.extend_batch, [r for r, _ in batch])
                except Exception as exc:  # a bug in one forward fails its batch, not the worker
                    results = [exc] * len(batch)
                if self.on_batch is not None:
                    self.on_batch(len(batch), time.perf_counter() - started)
                for (_, future), result in zip(batch, results):
                    if future.done():
                        continue
                    if isinstance(result, BaseException):
                        future.set_exception(result)
                    else:
                        future.set_result(result)

    async def aclose(self) -> None:
        """Refuse new requests, let the batch being computed finish and answer its waiters, fail the queued rest.

        The forward runs on a worker thread that cannot be interrupted, so cancelling the worker task would leave
        that batch's waiters unanswered; it is awaited instead.
        """
        self._closed = True
        self._wakeup.set()
        if self._worker is not None:
            await asyncio.gather(self._worker, return_exceptions=True)
        for _, future in self._queue:
            if not future.done():
                future.set_exception(RuntimeError("the batcher closed before this request ran"))
        self._queue.clear()
