"""Inference engines: one registry, name -> factory(model, options) -> run(batch) -> embeddings.

An engine takes a preprocessed float32 batch ``(B, 3, S, S)`` and returns float32 unit
embeddings ``(B, D)``. Add one with ``@ENGINES.register(name, spec=EngineSpec(...))`` (the
one :class:`~.registry.Registry` shape; the builder's docstring is its summary); the service
and the CLI pick it by name and :func:`create_engine` builds it. Each engine states the
largest cosine distance from the eager PyTorch reference it may show on real photos
(``EngineSpec.tolerance``): an engine that
converts the model checks that bound when it converts, and the tests check it for every engine.

``onnx`` runs a model's exported ONNX file, or exports the whole
:class:`~.network.EmbeddingNet` once per model fingerprint and caches it (:mod:`.export`);
``onnx-int8`` quantises that export. Any :class:`~.model.Model` runs on them, a serving model
without PyTorch, so this module imports torch only inside the functions that need it.
Speed and accuracy of every engine: ``benchmarks/embed.py`` and ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import EngineError
from .export import FP32_TOLERANCE, INT8_TOLERANCE, conversion_dir, onnx_file, require
from .model import Model
from .registry import Registry
from .runtime import Engine, ort_runner, torch_runner

__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "Engine",
    "EngineError",
    "EngineOptions",
    "EngineSpec",
    "create_engine",
]

DEFAULT_ENGINE = "onnx-int8"
"""The fastest engine that keeps the reference accuracy (see benchmarks/RESULTS.md)."""


@dataclass(frozen=True)
class EngineOptions:
    """How an engine runs: its thread count and where converted models are cached.

    ``threads`` is the forward pass's intra-op thread count. ``cache_dir=None`` converts
    into a temporary directory on every start.
    """

    threads: int = 2
    cache_dir: Path | None = None


@dataclass(frozen=True)
class EngineSpec:
    """What an engine states before it is built."""

    tolerance: float
    """Largest cosine distance ``1 - cos`` from the eager reference on real photos."""
    packages: tuple[tuple[str, str], ...] = ()
    """``(module, pip package)`` pairs the engine needs."""


ENGINES: Registry[Engine] = Registry("engine", EngineError)
"""Every engine by name: ``build(model, options) -> run``; ``spec`` is an :class:`EngineSpec`."""


def create_engine(name: str, model: Model, options: EngineOptions | None = None) -> Engine:
    """Build engine ``name`` for ``model``; a clear :class:`EngineError` if it cannot be."""
    for module, package in ENGINES[name].spec.packages:
        require(name, module, package)
    return ENGINES.create(name, model=model, options=options or EngineOptions())


# -- PyTorch ----------------------------------------------------------------------------------

TORCH_PACKAGES = (("torch", "torch"),)


@ENGINES.register("torch", spec=EngineSpec(1e-5, TORCH_PACKAGES))
def torch_engine(model: Model, options: EngineOptions) -> Engine:
    """Eager PyTorch fp32 in channels_last layout: the reference engine.

    Tuned variants were measured and left out (benchmarks/RESULTS.md): bf16 autocast was
    1.3x faster and drifted to cosine 0.989; ``torch.compile`` took 45 s to compile for
    1.35x; ONNX Runtime was 6-8x faster than either.
    """
    net = model.torch_net()
    import torch

    torch.set_num_threads(options.threads)
    return torch_runner(net.eval().to(memory_format=torch.channels_last))


# -- ONNX Runtime -----------------------------------------------------------------------------

ONNX_PACKAGES = (("onnxruntime", "onnxruntime"), ("onnx", "onnx"))


@ENGINES.register("onnx", spec=EngineSpec(FP32_TOLERANCE, ONNX_PACKAGES))
def onnx_engine(model: Model, options: EngineOptions) -> Engine:
    """ONNX Runtime fp32 on the exported EmbeddingNet (export cached per model)."""
    with conversion_dir(options.cache_dir) as directory:
        return ort_runner(onnx_file(model, directory, False, "onnx"), options.threads)


@ENGINES.register("onnx-int8", spec=EngineSpec(INT8_TOLERANCE, ONNX_PACKAGES))
def onnx_int8_engine(model: Model, options: EngineOptions) -> Engine:
    """ONNX Runtime int8: static per-channel QDQ calibrated on real photos (cached per model)."""
    with conversion_dir(options.cache_dir) as directory:
        return ort_runner(onnx_file(model, directory, True, "onnx-int8"), options.threads)
