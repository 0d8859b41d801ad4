"""Inference engines: one registry, name -> factory(model, options) -> run(batch) -> embeddings.

An engine takes a preprocessed float32 batch ``(B, 3, S, S)`` and returns float32 unit
embeddings ``(B, D)``. Add one with :func:`register_engine`; the service and the CLI pick it
by name and :func:`create_engine` builds it. Each engine states the largest cosine distance
from the eager PyTorch reference it may show on real photos (``tolerance``): an engine that
converts the model checks that bound when it converts, and the tests check it for every engine.

``onnx`` exports the whole :class:`~.network.EmbeddingNet` (trunks, taps, head, L2) once per
model fingerprint and caches the file, so a second start only loads it; ``onnx-int8``
quantises that export. Both also run a serving model (:mod:`.serving`: an export without
PyTorch), so this module imports torch only inside the functions that need it.
Speed and accuracy of every engine: ``benchmarks/embed.py`` and ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib
import io
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from .preprocess import Preprocessor

if TYPE_CHECKING:
    from .bundle import ModelBundle
    from .serving import ServingModel

    Model = ModelBundle | ServingModel

__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "Engine",
    "EngineError",
    "EngineOptions",
    "EngineSpec",
    "create_engine",
    "export_onnx",
    "onnx_conversions",
    "reference_images",
    "register_engine",
]

log = logging.getLogger(__name__)

DEFAULT_ENGINE = "onnx-int8"
"""The fastest engine that keeps the reference accuracy (see benchmarks/RESULTS.md)."""

VERIFY_IMAGES = 16
"""Real photos a converted model is checked on against the reference."""


class EngineError(ValueError):
    """An unknown engine, one whose package is not installed, or a conversion that drifted."""


Engine = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class EngineOptions:
    """How an engine runs: its thread count and where converted models are cached.

    ``threads`` is the forward pass's intra-op thread count. ``cache_dir=None`` converts
    into a temporary directory on every start.
    """

    threads: int = 2
    cache_dir: Path | None = None


EngineFactory = Callable[["Model", EngineOptions], Engine]


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
        _require(name, module, package)
    return spec.factory(model, options or EngineOptions())


def _require(engine: str, module: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise EngineError(
            f"engine {engine!r} needs the Python package {package!r}, which is not installed: "
            f"pip install {package} (or choose another engine)"
        ) from exc


def _is_serving(model: Model) -> bool:
    return not hasattr(model, "net")


def reference_images(model: Model, count: int) -> np.ndarray:
    """The first ``count`` bundled demo photos, preprocessed for ``model``: ``(N, 3, S, S)``.

    Real photographs, so a conversion is checked (and int8 calibrated) on the inputs it
    will see rather than on noise, whose activations look nothing like a photo's.
    """
    from ..demo import DEMO_IMAGES

    config = model.config
    preprocessor = Preprocessor(config.input_size, config.mean, config.std)
    paths = sorted(DEMO_IMAGES.glob("*/*.jpg"))[:count]
    batch = np.empty((len(paths), 3, config.input_size, config.input_size), np.float32)
    for row, path in zip(batch, paths, strict=True):
        preprocessor(preprocessor.decode(path.read_bytes()), out=row)
    return batch


# -- PyTorch ----------------------------------------------------------------------------------

TORCH_PACKAGES = (("torch", "torch"),)


@register_engine("torch", tolerance=1e-5, packages=TORCH_PACKAGES)
def torch_engine(model: Model, options: EngineOptions) -> Engine:
    """Eager PyTorch fp32 in channels_last layout: the reference engine.

    Tuned variants were measured and left out (benchmarks/RESULTS.md): bf16 autocast was
    1.3x faster and drifted to cosine 0.989; ``torch.compile`` took 45 s to compile for
    1.35x; ONNX Runtime was 6-8x faster than either.
    """
    if _is_serving(model):
        raise EngineError(
            f"engine 'torch' needs a model bundle with PyTorch weights; {model.name} is a "
            "serving model (ONNX only): use --engine onnx or onnx-int8"
        )
    import torch

    torch.set_num_threads(options.threads)
    net = model.net.eval().to(memory_format=torch.channels_last)
    return functools.partial(_torch_forward, net)


def _torch_forward(net: Any, batch: np.ndarray) -> np.ndarray:
    import torch

    with torch.inference_mode():
        tensor = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
        return net(tensor).float().numpy()


# -- ONNX Runtime -----------------------------------------------------------------------------

ONNX_PACKAGES = (("onnxruntime", "onnxruntime"), ("onnx", "onnx"))
EXPORT_PACKAGES = (("torch", "torch"), ("onnxscript", "onnxscript"))


@register_engine("onnx", tolerance=1e-5, packages=ONNX_PACKAGES)
def onnx_engine(model: Model, options: EngineOptions) -> Engine:
    """ONNX Runtime fp32 on the exported EmbeddingNet (export cached per model)."""
    with _model_dir(options) as directory:
        return _ort_runner(_fp32_onnx(model, directory, "onnx"), options.threads)


@register_engine("onnx-int8", tolerance=0.05, packages=ONNX_PACKAGES)
def onnx_int8_engine(model: Model, options: EngineOptions) -> Engine:
    """ONNX Runtime int8: static per-channel QDQ calibrated on real photos (cached per model)."""
    with _model_dir(options) as directory:
        return _ort_runner(_int8_onnx(model, directory), options.threads)


@contextlib.contextmanager
def onnx_conversions(
    model: Model, cache_dir: Path | None, int8: bool = True
) -> Iterator[tuple[Path, Path | None]]:
    """The model's verified fp32 ONNX file and, when ``int8``, its int8 one: converted once
    per ``cache_dir`` (or into a temporary directory), valid inside the ``with`` block."""
    with _model_dir(EngineOptions(cache_dir=cache_dir)) as directory:
        yield _fp32_onnx(model, directory, "onnx"), _int8_onnx(model, directory) if int8 else None


def _int8_onnx(model: Model, directory: Path) -> Path:
    """A serving model's own int8 file, or the quantised model cached in ``directory``."""
    if _is_serving(model) and model.int8_path is not None:
        return model.int8_path
    fp32 = _fp32_onnx(model, directory, "onnx-int8")
    return _cached(directory / f"{model.fingerprint}.int8.onnx",
                   lambda target: _quantize(model, fp32, target))


def _fp32_onnx(model: Model, directory: Path, engine: str) -> Path:
    """A serving model's own ONNX file, or the bundle's export cached in ``directory``."""
    if _is_serving(model):
        return model.onnx_path
    for module, package in EXPORT_PACKAGES:
        _require(engine, module, package)
    return _cached(directory / f"{model.fingerprint}.fp32.onnx",
                   lambda target: export_onnx(model, target))


@contextlib.contextmanager
def _model_dir(options: EngineOptions) -> Iterator[Path]:
    """``cache_dir/engines``, or a temporary directory removed once the session is loaded."""
    if options.cache_dir is not None:
        directory = Path(options.cache_dir) / "engines"
        directory.mkdir(parents=True, exist_ok=True)
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix="lookalike-engine-") as tmp:
        yield Path(tmp)


def _cached(path: Path, build: Callable[[Path], None]) -> Path:
    """``path``, built by ``build(tmp)`` and moved into place atomically when missing, so
    that concurrent or interrupted starts never see half a file."""
    if path.is_file():
        return path
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        build(Path(tmp))
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def export_onnx(bundle: ModelBundle, target: Path) -> None:
    """Export the whole EmbeddingNet to ``target`` with a dynamic batch axis, then check it
    against eager PyTorch on real photos (:class:`EngineError` when it drifts).

    The dynamo exporter specialises the fixed image size, so TF-style "same" padding folds
    into the convolutions; the TorchScript exporter keeps it as run-time Shape/Pad ops,
    measured 1.4x slower under ONNX Runtime.
    """
    import torch

    log.info("exporting model %s to ONNX (once per model)", bundle.name)
    size = bundle.config.input_size
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                bundle.net.eval(), (torch.zeros(2, 3, size, size),),
                input_names=["images"], output_names=["embeddings"],
                dynamic_shapes=({0: batch},), dynamo=True, optimize=True, verbose=False,
            )
            program.save(str(target))
    except Exception as exc:  # the exporter raises many types for unsupported modules
        raise EngineError(f"cannot export model {bundle.name} to ONNX: {exc}") from exc
    reference = functools.partial(_torch_forward, bundle.net)
    _verify(bundle, _ort_runner(target, threads=1), reference, "onnx")


CALIBRATION_IMAGES = 112
"""Demo photos for int8: the first VERIFY_IMAGES are held out for the check, the other 96 set
the activation ranges (48, 96 and 184 photos gave the same drift; calibration runs ~60 ms
per photo, so more only slows the first start)."""
FLOAT_CONVS = 3
"""Leading convolutions kept in fp32: the stem and the first block at full resolution. Int8
noise there grows through every later layer (measured: the features' SQNR fell from 53 to
24 dB in the first block); keeping them halves the drift at no measurable cost in speed."""


def _quantize(model: Model, fp32: Path, target: Path) -> None:
    """Static int8 QDQ quantisation of the fp32 model, checked on held-out photos against
    eager PyTorch (or, for a serving model, against its fp32 export).

    Per-channel weights, uint8 activations with ranges from a moving average of per-batch
    min/max over real photos (plain min/max let single outliers widen the ranges). Only the
    trunks are quantised, less their first :data:`FLOAT_CONVS` convolutions: pooling, taps,
    fusion, the projection head and the L2 normalisation stay fp32 (cheap, and a shared
    8-bit scale would crush small features next to large ones).
    """
    onnx = importlib.import_module("onnx")
    quantization = importlib.import_module("onnxruntime.quantization")
    shape_inference = importlib.import_module("onnxruntime.quantization.shape_inference")
    log.info("quantising model %s to int8 (once per model)", model.name)
    images = reference_images(model, CALIBRATION_IMAGES)[VERIFY_IMAGES:]

    class Calibration(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self.starts = iter(range(0, len(images), 8))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.starts, None)
            return None if start is None else {"images": images[start : start + 8]}

    with tempfile.TemporaryDirectory(prefix="lookalike-int8-") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        shape_inference.quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)
        trunk = [node for node in onnx.load(str(prepared)).graph.node if _in_trunk(node)]
        if not trunk:
            raise EngineError(f"cannot find the trunk of model {model.name} in its ONNX graph")
        with _quiet():
            quantization.quantize_static(
                str(prepared), str(target), Calibration(),
                quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                activation_type=quantization.QuantType.QUInt8,
                weight_type=quantization.QuantType.QInt8,
                calibrate_method=quantization.CalibrationMethod.MinMax,
                nodes_to_quantize=[node.name for node in trunk],
                nodes_to_exclude=[n.name for n in trunk if n.op_type == "Conv"][:FLOAT_CONVS],
                extra_options={"CalibMovingAverage": True},
            )
    reference = (_ort_runner(fp32, threads=1) if _is_serving(model)
                 else functools.partial(_torch_forward, model.net))
    _verify(model, _ort_runner(target, threads=1), reference, "onnx-int8")


def _in_trunk(node: Any) -> bool:
    """Whether an exported ONNX node comes from ``EmbeddingNet.trunks`` (the exporter records
    each node's module path in its metadata)."""
    scopes = {prop.key: prop.value for prop in node.metadata_props}.get(
        "pkg.torch.onnx.name_scopes", "[]"
    )
    return any(scope.startswith("trunks.") for scope in ast.literal_eval(scopes))


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's progress prints and the converters' INFO logs (some go to the
    root logger), which would otherwise flood a service's log on its first start."""
    previous = logging.root.manager.disable
    logging.disable(logging.INFO)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logging.disable(previous)


def _verify(model: Model, run: Engine, reference: Engine, name: str) -> None:
    """Refuse a converted model whose embeddings drift past the engine's tolerance."""
    images = reference_images(model, VERIFY_IMAGES)
    distance = float((1.0 - (run(images) * reference(images)).sum(axis=1)).max())
    tolerance = ENGINES[name].tolerance
    log.info("%s engine for %s: largest cosine distance from the reference on %d photos: %.2e",
             name, model.name, len(images), distance)
    if not distance <= tolerance:
        raise EngineError(
            f"the {name} conversion of model {model.name} drifts from the reference: cosine "
            f"distance {distance:.2e} on real photos exceeds {tolerance:.0e}; use another engine"
        )


ORT_CHUNK = 8
"""Largest batch one ONNX Runtime call gets. Bigger batches cost more per image on CPU
(measured, one thread, ms/image at batch 4 / 64: fp32 8.2 / 10.9, int8 3.8 / 4.4): their
activations no longer fit the cache. Larger batches are run in chunks of this size."""


def _ort_runner(path: Path, threads: int) -> Engine:
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
