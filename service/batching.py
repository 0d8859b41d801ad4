"""Micro-batching: concurrent requests share one forward pass, in a three-thread pipeline.

A request hands its encoded uploads (or preprocessed arrays) to :meth:`MicroBatcher.embed` and
awaits the result; none of the work runs on the event loop. Long-lived threads do it:

- the *decode* threads (``decode_workers`` of them) decode and preprocess each request as soon
  as it arrives, and add it to the ready list; with more than one, a slow image (a large PNG
  takes a second) holds up only its own thread while other requests' images decode beside it
  (Pillow releases the GIL while decoding). A request whose images declare more than
  ``large_image_pixels`` of decoding work in their headers (read without decoding; see
  ``declared_work``) is passed to a *large-image* thread of its own, so however many clients
  send huge images, they queue behind each other and never take every decode thread from
  normal-size uploads. With ``decode_timeout_s`` that thread decodes in a worker process
  (``decode_process.py``) that is killed and replaced when an image passes the deadline: the
  costly images are the ones a deadline is for, and only they pay for the process;
- the *forward* thread takes everything on the ready list (up to ``max_size`` images) and runs
  the engine once;
- the *finish* thread runs each request's ``then`` step (e.g. its index search and the items'
  metadata), off the forward thread, which is the pipeline's bottleneck on a CPU, and wakes the
  event loop once for the whole batch.

So a lone request runs at once, and under load a batch is whatever was decoded while the
previous forward pass ran: batches grow with the load, with no timer, and decoding overlaps the
forward pass all the time (``max_wait_ms`` can still make a batch wait for company).

Why not ``run_in_threadpool`` per step: on this 2-core machine each such trip costs the server
about 0.4 ms of CPU (measured: a sync ``/health`` 0.78 ms a request, an async one 0.37 ms), and a
request needed three (decode, forward, search). Here a request costs one queue put and a share
of a few wake-ups per batch.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from starlette.concurrency import run_in_threadpool

from ..models.preprocess import ImageDecodeError, Preprocessor, declared_work
from .decode_process import DecodeProcess
from .metrics import ServiceMetrics

__all__ = ["MicroBatcher", "DirectEmbedder", "EmbedBatch", "Then", "prepare_inputs"]

log = logging.getLogger(__name__)

EmbedBatch = Callable[[np.ndarray], np.ndarray]
"""The engine: ``(B, 3, S, S)`` float32 -> ``(B, D)`` unit vectors."""
Then = Callable[[np.ndarray], Any]
"""A request's step once its vectors exist (e.g. its search), run off the event loop."""
Inputs = Sequence[bytes] | np.ndarray
"""Encoded images, or preprocessed arrays ``(n, 3, S, S)``."""
Decode = Callable[[bytes], np.ndarray]
"""Encoded image -> preprocessed ``(3, S, S)`` float32, done elsewhere (e.g. in a process)."""


def prepare_inputs(
    preprocessor: Preprocessor | None,
    inputs: Inputs,
    names: Sequence[str] | None = None,
    decode: Decode | None = None,
) -> np.ndarray:
    """``(n, 3, S, S)`` float32 from arrays as they are, or from encoded images decoded and
    preprocessed (by ``decode`` when given, else here); a decoding error names its upload when
    ``names`` are given."""
    if isinstance(inputs, np.ndarray):
        return np.ascontiguousarray(inputs, np.float32)
    if preprocessor is None:
        raise TypeError("this embedder has no preprocessor: give it preprocessed arrays")
    size = preprocessor.size
    out = np.empty((len(inputs), 3, size, size), np.float32)
    for position, (data, row) in enumerate(zip(inputs, out, strict=True)):
        try:
            if decode is None:
                preprocessor(preprocessor.decode(data), out=row)
            else:
                row[...] = decode(data)
        except ImageDecodeError as exc:
            if names is None:
                raise
            raise type(exc)(f"upload {names[position]!r}: {exc}") from exc
    return out


@dataclass(eq=False)
class _Job:
    inputs: Inputs
    names: Sequence[str] | None
    then: Then | None
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    queued: float = field(default_factory=time.perf_counter)
    outcome: Any = None
    error: BaseException | None = None

    def __len__(self) -> int:
        return len(self.inputs)

    def settle(self) -> None:
        """Runs on the event loop: hand the outcome to the waiting request, if it still waits."""
        if self.future.done():  # a request that timed out has cancelled its future
            return
        if self.error is not None:
            self.future.set_exception(self.error)
        else:
            self.future.set_result(self.outcome)


class MicroBatcher:
    """Embeds the inputs of concurrent requests together; see the module's docstring."""

    def __init__(
        self,
        embed: EmbedBatch,
        metrics: ServiceMetrics,
        preprocessor: Preprocessor | None = None,
        max_size: int = 16,
        max_wait_ms: float = 0.0,
        decode_workers: int = 2,
        large_image_pixels: int = 4_000_000,
        decode_timeout_s: float | None = None,
    ) -> None:
        self._embed = embed
        self._decode_workers = decode_workers
        self._large_image_pixels = large_image_pixels
        self._large_inbox: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self.decode_process = (
            DecodeProcess(preprocessor, decode_timeout_s)
            if preprocessor is not None and decode_timeout_s is not None
            else None
        )
        """The large-image lane's killable worker (None: that lane decodes in its thread)."""
        self._decoding = 0  # decode threads still running
        self._metrics = metrics
        self._preprocessor = preprocessor
        self._max_size = max_size
        self._max_wait = max_wait_ms / 1000.0
        self._inbox: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._ready: list[tuple[_Job, np.ndarray]] = []
        self._ready_changed = threading.Condition()
        self._finished: queue.SimpleQueue[list[_Job] | None] = queue.SimpleQueue()
        self._stopping = False
        self._threads: list[threading.Thread] = []

    async def start(self) -> None:
        self._stopping = False
        self._decoding = self._decode_workers + 1
        self._threads = [
            *(
                threading.Thread(
                    target=self._decode_loop, args=(self._inbox,), name=f"decode-{n}", daemon=True
                )
                for n in range(self._decode_workers)
            ),
            threading.Thread(target=self._large_loop, name="decode-large", daemon=True),
            threading.Thread(target=self._forward_loop, name="forward", daemon=True),
            threading.Thread(target=self._finish_loop, name="finish", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    async def stop(self) -> None:
        if not self._threads:
            return
        for _ in range(self._decode_workers):
            self._inbox.put(None)
        self._large_inbox.put(None)
        await run_in_threadpool(lambda: [thread.join() for thread in self._threads])
        self._threads = []
        if self.decode_process is not None:
            await run_in_threadpool(self.decode_process.close)

    async def embed(
        self, inputs: Inputs, names: Sequence[str] | None = None, then: Then | None = None
    ) -> Any:
        """Vectors ``(n, D)`` of ``inputs`` (or ``then(vectors)`` when given), computed in a
        batch with whatever else is waiting. Decoding errors are raised here, for this request
        only."""
        if not self._threads:
            raise RuntimeError("the micro-batcher is not started")
        loop = asyncio.get_running_loop()
        job = _Job(inputs, names, then, loop.create_future(), loop)
        self._inbox.put(job)
        return await job.future

    def _decode_loop(
        self, inbox: queue.SimpleQueue[_Job | None], decode: Decode | None = None
    ) -> None:
        while (job := inbox.get()) is not None:
            if job.future.done():  # its request timed out while it queued: skip the work
                continue
            if inbox is self._inbox and self._is_large(job):
                self._large_inbox.put(job)
                continue
            try:
                arrays = prepare_inputs(self._preprocessor, job.inputs, job.names, decode)
            except Exception as exc:  # this request's bad input fails this request only
                job.error = exc
                _settle_soon([job])
                continue
            with self._ready_changed:
                self._ready.append((job, arrays))
                self._ready_changed.notify()
        with self._ready_changed:
            self._decoding -= 1
            if self._decoding == 0:  # the last decode thread out: the forward thread may stop
                self._stopping = True
                self._ready_changed.notify()

    def _large_loop(self) -> None:
        """The large-image lane: its worker process starts here (about a second of imports),
        so the service's start does not wait for it."""
        if self.decode_process is not None:
            try:
                self.decode_process.start()
            except Exception:  # it starts on first use instead
                log.exception("the decode worker did not start")
        self._decode_loop(self._large_inbox, self.decode_process)

    def _is_large(self, job: _Job) -> bool:
        """Whether the job's images declare more decoding work than a normal-size upload
        (headers only: a few microseconds an image)."""
        if isinstance(job.inputs, np.ndarray):
            return False
        return sum(declared_work(data) for data in job.inputs) > self._large_image_pixels

    def _take(self) -> list[tuple[_Job, np.ndarray]] | None:
        """Everything decoded so far, up to ``max_size`` images (at least one request); None
        once stopping with nothing left."""
        with self._ready_changed:
            while not self._ready:
                if self._stopping:
                    return None
                self._ready_changed.wait()
            if self._max_wait > 0:
                deadline = time.perf_counter() + self._max_wait
                while not self._stopping and sum(len(j) for j, _ in self._ready) < self._max_size:
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0:
                        break
                    self._ready_changed.wait(remaining)
            taken, size = 0, 0
            while taken < len(self._ready) and (
                taken == 0 or size + len(self._ready[taken][0]) <= self._max_size
            ):
                size += len(self._ready[taken][0])
                taken += 1
            batch, self._ready = self._ready[:taken], self._ready[taken:]
            return batch

    def _forward_loop(self) -> None:
        while (ready := self._take()) is not None:
            started = time.perf_counter()
            for job, _ in ready:
                self._metrics.queue_wait.observe(started - job.queued)
            self._metrics.batch_size.observe(sum(len(job) for job, _ in ready))
            self._run(ready)
            jobs = [job for job, _ in ready]
            if any(job.then is not None and job.error is None for job in jobs):
                self._finished.put(jobs)
            else:
                _settle_soon(jobs)
        self._finished.put(None)

    def _finish_loop(self) -> None:
        while (jobs := self._finished.get()) is not None:
            for job in jobs:
                if job.then is None or job.error is not None:
                    continue
                try:
                    job.outcome = job.then(job.outcome)
                except Exception as exc:
                    job.error = exc
            _settle_soon(jobs)

    def _run(self, ready: list[tuple[_Job, np.ndarray]]) -> None:
        arrays = [array for _, array in ready]
        try:
            vectors = self._embed(arrays[0] if len(arrays) == 1 else np.concatenate(arrays))
        except Exception as exc:  # the engine's error reaches every caller; the thread lives on
            for job, _ in ready:
                job.error = exc
            return
        offset = 0
        for job, _ in ready:
            job.outcome = vectors[offset : offset + len(job)]
            offset += len(job)


def _settle_soon(jobs: list[_Job]) -> None:
    """From a worker thread: settle ``jobs`` on their event loop, with one wake-up."""
    try:
        jobs[0].loop.call_soon_threadsafe(_settle_all, jobs)
    except RuntimeError:  # the event loop has closed: nobody is waiting any more
        pass


def _settle_all(jobs: list[_Job]) -> None:
    for job in jobs:
        job.settle()


class DirectEmbedder:
    """No batching: each request decodes and runs the engine itself, in one trip to the thread
    pool (the comparison point for :class:`MicroBatcher` in ``benchmarks/load.py``)."""

    def __init__(
        self, embed: EmbedBatch, metrics: ServiceMetrics, preprocessor: Preprocessor | None = None
    ) -> None:
        self._embed = embed
        self._metrics = metrics
        self._preprocessor = preprocessor

    async def embed(
        self, inputs: Inputs, names: Sequence[str] | None = None, then: Then | None = None
    ) -> Any:
        return await run_in_threadpool(self._embed_now, inputs, names, then)

    def _embed_now(self, inputs: Inputs, names: Sequence[str] | None, then: Then | None) -> Any:
        batch = prepare_inputs(self._preprocessor, inputs, names)
        self._metrics.batch_size.observe(len(batch))
        vectors = self._embed(batch)
        return then(vectors) if then is not None else vectors

    async def start(self) -> None:
        """Nothing to start."""

    async def stop(self) -> None:
        """Nothing to stop."""
