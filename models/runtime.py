"""The engine runtime: running a model once it is in a runnable form, and checking it.

An engine is ``run(batch) -> embeddings``: a preprocessed float32 batch ``(B, 3, S, S)`` in,
float32 unit embeddings ``(B, D)`` out. This module builds those functions from an ONNX file
(:func:`ort_runner`) or a PyTorch network (:func:`torch_runner`), and checks a converted model
against a reference on real photos (:func:`verify`). It imports torch only inside
:func:`torch_forward`; :mod:`.export` (conversion) and :mod:`.engines` (the registry) build on it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from .errors import EngineError
from .model import Model
from .preprocess import Preprocessor

__all__ = ["Engine", "ORT_CHUNK", "VERIFY_IMAGES", "ort_runner", "quiet", "reference_images",
           "torch_forward", "torch_runner", "verify"]

log = logging.getLogger(__name__)

Engine = Callable[[np.ndarray], np.ndarray]

VERIFY_IMAGES = 16
"""Real photos a converted model is checked on against the reference."""


def reference_images(model: Model, count: int) -> np.ndarray:
    """The first ``count`` bundled demo photos, preprocessed for ``model``: ``(N, 3, S, S)``.

    Real photographs, so a conversion is checked (and int8 calibrated) on the inputs it
    will see rather than on noise, whose activations look nothing like a photo's.
    """
    from ..demo import DEMO_IMAGES

    facts = model.facts
    preprocessor = Preprocessor(facts.input_size, facts.mean, facts.std)
    paths = sorted(DEMO_IMAGES.glob("*/*.jpg"))[:count]
    batch = np.empty((len(paths), 3, facts.input_size, facts.input_size), np.float32)
    for row, path in zip(batch, paths, strict=True):
        preprocessor(preprocessor.decode(path.read_bytes()), out=row)
    return batch


def torch_runner(net: Any) -> Engine:
    """Eager PyTorch on ``net`` (an EmbeddingNet in eval mode)."""
    return functools.partial(torch_forward, net)


def torch_forward(net: Any, batch: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        tensor = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
        return net(tensor).float().numpy()


def verify(model: Model, run: Engine, reference: Engine, name: str, tolerance: float) -> None:
    """Refuse a converted model whose embeddings drift past ``tolerance`` (cosine distance)."""
    images = reference_images(model, VERIFY_IMAGES)
    distance = float((1.0 - (run(images) * reference(images)).sum(axis=1)).max())
    log.info("%s engine for %s: largest cosine distance from the reference on %d photos: %.2e",
             name, model.name, len(images), distance)
    if not distance <= tolerance:
        raise EngineError(
            f"the {name} conversion of model {model.name} drifts from the reference: cosine "
            f"distance {distance:.2e} on real photos exceeds {tolerance:.0e}; use another engine"
        )


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporter's progress prints and the converters' INFO logs (some go to the
    root logger), which would otherwise flood a service's log on its first start."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


ORT_CHUNK = 8
"""Largest batch one ONNX Runtime call gets. Bigger batches cost more per image on CPU
(measured, one thread, ms/image at batch 4 / 64: fp32 8.2 / 10.9, int8 3.8 / 4.4): their
activations no longer fit the cache. Larger batches are run in chunks of this size."""


def ort_runner(path: Path, threads: int) -> Engine:
    """An ONNX Runtime CPU session with deliberate threading, run in :data:`ORT_CHUNK` chunks.

    ``threads`` intra-op threads that never spin-wait: idle runtime threads would otherwise
    burn the cores that the decoding threads (and other processes) need on a small machine.
    """
    ort = importlib.import_module("onnxruntime")
    settings = ort.SessionOptions()
    settings.intra_op_num_threads = threads
    settings.inter_op_num_threads = 1
    settings.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    settings.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    settings.add_session_config_entry("session.intra_op.allow_spinning", "0")
    settings.log_severity_level = 3
    session = ort.InferenceSession(str(path), settings, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name

    def run(batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, np.float32)
        if len(batch) <= ORT_CHUNK:
            return session.run(None, {input_name: batch})[0]
        return np.concatenate([
            session.run(None, {input_name: batch[start : start + ORT_CHUNK]})[0]
            for start in range(0, len(batch), ORT_CHUNK)
        ])

    return run
