"""A wall-clock deadline per decode: costly images decode in a worker process that is killed,
and replaced, when an image runs past ``decode_timeout_s``.

Why a process: Pillow's and libjpeg's decoders cannot be interrupted from Python (a thread
inside a C decode runs to its end whatever the caller wants), so the only deadline that holds is
one that can kill the work. Starting a process, and copying the bytes in and the array out,
costs about a millisecond an image, so only the large-image lane of the micro-batcher uses it:
requests whose headers say they will be costly (see ``preprocess.declared_work``). Normal-size
uploads decode in threads as before and pay nothing.

The worker is started (and its imports done) before it is handed an image, so an image's
deadline counts only its own decode. One worker serves the lane: costly images queue behind each
other, never in front of normal ones.
"""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from PIL import Image

from ..models.preprocess import CorruptImageError, ImageDecodeError, Preprocessor

__all__ = ["DecodeProcess", "DecodeTimeoutError"]

log = logging.getLogger(__name__)


class DecodeTimeoutError(ImageDecodeError):
    """An image whose decoding took longer than the service's per-image deadline (HTTP 422)."""


_READY = "ready"
ARRAY, IMAGE = "array", "image"
"""What a worker answers: the preprocessed model input, or the decoded image itself."""


def _serve(conn: Connection, preprocessor: Preprocessor) -> None:
    """The worker: decode each image it is sent (``(ARRAY or IMAGE, bytes)``), answer
    ``("ok", array or image)`` or ``("error", ImageDecodeError)``. Any other failure ends the
    process; the parent sees it."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the group; the parent stops us
    conn.send(_READY)
    while True:
        try:
            kind, data = conn.recv()
        except (EOFError, OSError):  # the parent closed the pipe: stop
            return
        try:
            image = preprocessor.decode(data)
            reply: tuple[str, object] = ("ok", preprocessor(image) if kind == ARRAY else image)
        except ImageDecodeError as exc:
            reply = ("error", exc)
        conn.send(reply)


class DecodeProcess:
    """Decode one image at a time in a killable worker process, with a deadline.

    Calls are serialised (the worker decodes one image at a time): its callers are the
    micro-batcher's large-image thread and the thread-pool decode of a costly ``POST /items``.
    """

    def __init__(self, preprocessor: Preprocessor, timeout_s: float) -> None:
        self._preprocessor = preprocessor
        self._timeout = timeout_s
        self._context = multiprocessing.get_context("spawn")  # no fork of a threaded server
        self._process: multiprocessing.process.BaseProcess | None = None
        self._conn: Connection | None = None
        self._lock = threading.Lock()
        self.replaced = 0
        """Workers killed (deadline passed) or lost (crashed) and replaced since start."""

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    def start(self) -> None:
        """Start the worker, if it is not running, and wait until it is ready to decode (its
        imports take about a second)."""
        with self._lock:
            if self._process is None:
                self._start()

    def close(self) -> None:
        with self._lock:
            if self._process is None:
                return
            assert self._conn is not None
            self._conn.close()  # the worker's recv ends: it exits by itself
            self._process.join(5)
            if self._process.is_alive():
                self._process.kill()
                self._process.join()
            self._process = self._conn = None

    def __call__(self, data: bytes) -> np.ndarray:
        """``data`` decoded and preprocessed -> float32 ``(3, S, S)``; raises the decoder's
        :class:`ImageDecodeError`, or :class:`DecodeTimeoutError` past the deadline."""
        return self._run(ARRAY, data)

    def decode(self, data: bytes) -> Image.Image:
        """``data`` decoded to an RGB image (as ``Preprocessor.decode``), under the deadline."""
        return self._run(IMAGE, data)

    def _run(self, kind: str, data: bytes) -> Any:
        with self._lock:
            if self._process is None:
                self._start()
            assert self._conn is not None
            try:
                self._conn.send((kind, data))
                finished = self._conn.poll(self._timeout)
            except (BrokenPipeError, ConnectionResetError):  # the worker was gone already
                finished = True
            if not finished:
                self._replace("passed the decode deadline")
                raise DecodeTimeoutError(
                    f"the image took longer than {self._timeout:g} s to decode "
                    "(LOOKALIKE_DECODE_TIMEOUT_S); it was refused"
                )
            try:
                status, value = self._conn.recv()
            except (EOFError, OSError) as exc:
                self._replace("stopped while decoding")
                raise CorruptImageError(
                    "the image could not be decoded within the service's limits "
                    "(the decoder stopped on it)"
                ) from exc
        if status == "error":
            assert isinstance(value, ImageDecodeError)
            raise value
        return value

    def _start(self) -> None:
        parent, child = self._context.Pipe()
        process = self._context.Process(
            target=_serve, args=(child, self._preprocessor), name="lookalike-decode", daemon=True
        )
        process.start()
        child.close()
        if parent.recv() != _READY:
            raise RuntimeError("the decode worker did not start")
        self._process, self._conn = process, parent

    def _replace(self, why: str) -> None:
        """Kill the worker (an image still decoding cannot be stopped any other way) and start a
        fresh one, so the next costly image has a worker and a whole deadline of its own."""
        assert self._process is not None and self._conn is not None
        log.warning("decode worker %s %s: killed and replaced", self._process.pid, why)
        self._process.kill()
        self._process.join()
        self._conn.close()
        self._process = self._conn = None
        self.replaced += 1
        self._start()
