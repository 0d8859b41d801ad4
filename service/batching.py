"""Micro-batching: concurrent requests share one forward pass.

Each request decodes its own image (in the thread pool), then hands the preprocessed array to
the batcher and awaits its vector. One worker takes whatever is queued and runs the engine once,
on a single dedicated thread: forward passes never overlap and fight for the same cores, and a
batch amortises the per-call overhead that dominates on a CPU.

The worker waits (at most ``max_wait_ms``, up to ``max_size`` images) only for requests it knows
are coming: callers announce themselves with :meth:`MicroBatcher.incoming` while they decode. A
lone request therefore never waits for company that is not there, and under load a batch still
gathers the requests that were a millisecond behind.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np

from .metrics import ServiceMetrics

__all__ = ["MicroBatcher", "DirectEmbedder"]

EmbedBatch = Callable[[np.ndarray], np.ndarray]


class DirectEmbedder:
    """No batching: each request runs the engine itself, in the thread pool."""

    def __init__(self, embed: EmbedBatch, metrics: ServiceMetrics) -> None:
        self._embed = embed
        self._metrics = metrics

    async def embed(self, arrays: np.ndarray) -> np.ndarray:
        loop = asyncio.get_running_loop()
        self._metrics.batch_size.observe(len(arrays))
        return await loop.run_in_executor(None, self._embed, arrays)

    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Nothing to announce: every request runs alone."""
        yield

    async def start(self) -> None:
        """Nothing to start."""

    async def stop(self) -> None:
        """Nothing to stop."""


class MicroBatcher:
    """Collects arrays ``(n, 3, S, S)`` from concurrent callers into batches of images."""

    def __init__(
        self,
        embed: EmbedBatch,
        metrics: ServiceMetrics,
        max_size: int = 16,
        max_wait_ms: float = 3.0,
    ) -> None:
        self._embed = embed
        self._metrics = metrics
        self._max_size = max_size
        self._max_wait = max_wait_ms / 1000.0
        self._queue: asyncio.Queue[tuple[np.ndarray, asyncio.Future[np.ndarray], float]] | None = (
            None
        )
        self._worker: asyncio.Task[None] | None = None
        self._incoming = 0
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="forward")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._worker = asyncio.create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    @contextmanager
    def incoming(self) -> Iterator[None]:
        """Announce a request that is preparing its arrays and will call :meth:`embed` next,
        so that the batch being gathered waits for it."""
        self._incoming += 1
        try:
            yield
        finally:
            self._incoming -= 1

    async def embed(self, arrays: np.ndarray) -> np.ndarray:
        """Embed ``arrays`` ``(n, 3, S, S)`` together with whatever else is waiting."""
        if self._queue is None:
            raise RuntimeError("the micro-batcher is not started")
        future: asyncio.Future[np.ndarray] = asyncio.get_running_loop().create_future()
        await self._queue.put((arrays, future, time.perf_counter()))
        return await future

    async def _run(self) -> None:
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self._queue.get()]
            size = len(batch[0][0])
            deadline = loop.time() + self._max_wait
            while size < self._max_size:
                try:
                    item = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0 or not self._incoming:
                        break
                    try:
                        item = await asyncio.wait_for(self._queue.get(), remaining)
                    except TimeoutError:
                        break
                batch.append(item)
                size += len(item[0])
            await self._run_batch(loop, batch)

    async def _run_batch(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: list[tuple[np.ndarray, asyncio.Future[np.ndarray], float]],
    ) -> None:
        started = time.perf_counter()
        for _, _, queued in batch:
            self._metrics.queue_wait.observe(started - queued)
        arrays = np.concatenate([arrays for arrays, _, _ in batch])
        self._metrics.batch_size.observe(len(arrays))
        try:
            vectors = await loop.run_in_executor(self._executor, self._embed, arrays)
        except Exception as exc:  # the callers get the engine's error, the worker lives on
            for _, future, _ in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        offset = 0
        for arrays_in, future, _ in batch:
            if not future.done():  # a caller that timed out has cancelled its future
                future.set_result(vectors[offset : offset + len(arrays_in)])
            offset += len(arrays_in)
