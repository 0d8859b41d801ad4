"""Inference engines: one registry, name -> factory(model, options) -> run(batch) -> embeddings.

An engine takes a preprocessed float32 batch ``(B, 3, S, S)`` and returns float32 unit
embeddings ``(B, D)``. Add one with :func:`register_engine`; the service and the CLI pick it
by name and :func:`create_engine` builds it. Each engine states the largest cosine distance
from the eager PyTorch reference it may show on real photos (``tolerance``): an engine that
converts the model checks that bound when it converts, and the tests check it for every engine.

``onnx`` runs a model's exported ONNX file, or exports the whole
:class:`~.network.EmbeddingNet` once per model fingerprint and caches it (:mod:`.export`);
``onnx-int8`` quantises that export. Any :class:`~.model.Model` runs on them, a serving model
without PyTorch, so this module imports torch only inside the functions that need it.
Speed and accuracy of every engine: ``benchmarks/embed.py`` and ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import EngineError
from .export import FP32_TOLERANCE, INT8_TOLERANCE, conversion_dir, onnx_file, require
from .model import Model
from .runtime import Engine, ort_runner, torch_runner

__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "Engine",
    "EngineError",
    "EngineOptions",
    "EngineSpec",
    "create_engine",
    "register_engine",
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


EngineFactory = Callable[[Model, EngineOptions], Engine]


@dataclass(frozen=True)
class EngineSpec:
    name: str
    factory: EngineFactory
    tolerance: float
    """Largest cosine distance ``1 - cos`` from the eager reference on real photos."""
    packages: tuple[tuple[str, str], ...]
    """``(module, pip package)`` pairs the engine needs."""
    summary: str


ENGINES: dict[str, EngineSpec] = {}


def register_engine(
    name: str, *, tolerance: float, packages: tuple[tuple[str, str], ...] = ()
) -> Callable[[EngineFactory], EngineFactory]:
    """Register ``factory(model, options) -> run`` under ``name``; the first line of its
    docstring is the engine's one-line summary."""

    def decorator(factory: EngineFactory) -> EngineFactory:
        if name in ENGINES:
            raise EngineError(f"engine {name!r} is registered twice")
        summary = (factory.__doc__ or "").strip().split("\n")[0]
        ENGINES[name] = EngineSpec(name, factory, tolerance, packages, summary)
        return factory

    return decorator


def create_engine(name: str, model: Model, options: EngineOptions | None = None) -> Engine:
    """Build engine ``name`` for ``model``; a clear :class:`EngineError` if it cannot be."""
    spec = ENGINES.get(name)
    if spec is None:
        raise EngineError(f"unknown engine {name!r}; choose one of {', '.join(sorted(ENGINES))}")
    for module, package in spec.packages:
        require(name, module, package)
    return spec.factory(model, options or EngineOptions())


# -- PyTorch ----------------------------------------------------------------------------------

TORCH_PACKAGES = (("torch", "torch"),)


@register_engine("torch", tolerance=1e-5, packages=TORCH_PACKAGES)
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


@register_engine("onnx", tolerance=FP32_TOLERANCE, packages=ONNX_PACKAGES)
def onnx_engine(model: Model, options: EngineOptions) -> Engine:
    """ONNX Runtime fp32 on the exported EmbeddingNet (export cached per model)."""
    with conversion_dir(options.cache_dir) as directory:
        return ort_runner(onnx_file(model, directory, False, "onnx"), options.threads)


@register_engine("onnx-int8", tolerance=INT8_TOLERANCE, packages=ONNX_PACKAGES)
def onnx_int8_engine(model: Model, options: EngineOptions) -> Engine:
    """ONNX Runtime int8: static per-channel QDQ calibrated on real photos (cached per model)."""
    with conversion_dir(options.cache_dir) as directory:
        return ort_runner(onnx_file(model, directory, True, "onnx-int8"), options.threads)
