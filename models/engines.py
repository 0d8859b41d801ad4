"""Inference engines: one registry, name -> factory(bundle, options) -> run(batch) -> embeddings.

An engine takes a preprocessed float32 batch ``(B, 3, S, S)`` and returns float32 embeddings
``(B, D)``. Add one with :func:`register_engine`; the service and the CLI pick it by name
and :func:`create_engine` builds it. Each engine states the largest cosine distance from the
eager PyTorch reference it may show on real images (``tolerance``): an engine that converts
the model checks that bound when it converts, and the tests check it for every engine.

``onnx`` exports the whole :class:`~.network.EmbeddingNet` (trunks, taps, head, L2) once per
model fingerprint and caches the file, so a second start loads it in a fraction of a second.
Speed and accuracy of every engine: ``benchmarks/embed.py`` and ``benchmarks/RESULTS.md``.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import io
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from .bundle import ModelBundle
from .preprocess import Preprocessor

__all__ = [
    "DEFAULT_ENGINE",
    "ENGINES",
    "Engine",
    "EngineError",
    "EngineOptions",
    "EngineSpec",
    "create_engine",
    "register_engine",
    "reference_images",
]

log = logging.getLogger(__name__)

DEFAULT_ENGINE = "onnx"
"""The fastest engine that keeps the reference accuracy (see benchmarks/RESULTS.md)."""

VERIFY_IMAGES = 16
"""Real images an exported model is checked on against the eager reference."""


class EngineError(ValueError):
    """An unknown engine, one whose package is not installed, or a conversion that drifted."""


Engine = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class EngineOptions:
    """How an engine runs: its thread count and where converted models are cached.

    ``threads`` is the forward pass's intra-op thread count; on a 2-core machine leave
    the decoding threads something to run on (ONNX Runtime threads here never spin-wait).
    ``cache_dir=None`` converts into a temporary directory on every start.
    """

    threads: int = 2
    cache_dir: Path | None = None


EngineFactory = Callable[[ModelBundle, EngineOptions], Engine]


@dataclass(frozen=True)
class EngineSpec:
    name: str
    factory: EngineFactory
    tolerance: float
    """Largest cosine distance ``1 - cos`` from the eager reference on real images."""
    packages: tuple[tuple[str, str], ...]
    """``(module, pip package)`` pairs the engine needs beyond torch."""
    summary: str


ENGINES: dict[str, EngineSpec] = {}


def register_engine(
    name: str, *, tolerance: float, packages: tuple[tuple[str, str], ...] = ()
) -> Callable[[EngineFactory], EngineFactory]:
    """Register ``factory(bundle, options) -> run`` under ``name``; its docstring is the summary."""

    def decorator(factory: EngineFactory) -> EngineFactory:
        if name in ENGINES:
            raise EngineError(f"engine {name!r} is registered twice")
        summary = (factory.__doc__ or "").strip().splitlines()[0] if factory.__doc__ else ""
        ENGINES[name] = EngineSpec(name, factory, tolerance, packages, summary)
        return factory

    return decorator


def create_engine(
    name: str, bundle: ModelBundle, options: EngineOptions | None = None
) -> Engine:
    """Build engine ``name`` for ``bundle``; a clear :class:`EngineError` if it cannot be."""
    spec = ENGINES.get(name)
    if spec is None:
        raise EngineError(f"unknown engine {name!r}; choose one of {', '.join(sorted(ENGINES))}")
    for module, package in spec.packages:
        _require(name, module, package)
    return spec.factory(bundle, options or EngineOptions())


def _require(engine: str, module: str, package: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise EngineError(
            f"engine {engine!r} needs the Python package {package!r}, which is not installed: "
            f"pip install {package} (or choose another engine)"
        ) from exc


def reference_images(bundle: ModelBundle, count: int) -> np.ndarray:
    """The first ``count`` bundled demo images, preprocessed for ``bundle``: ``(N, 3, S, S)``.

    Real photographs, so a conversion is checked (and int8 calibrated) on the inputs it
    will see rather than on noise, whose activations look nothing like a photo's.
    """
    from ..demo import DEMO_IMAGES

    config = bundle.config
    preprocessor = Preprocessor(config.input_size, config.mean, config.std)
    paths = sorted(DEMO_IMAGES.glob("*/*.jpg"))[:count]
    batch = np.empty((len(paths), 3, config.input_size, config.input_size), np.float32)
    for row, path in zip(batch, paths, strict=True):
        preprocessor(preprocessor.decode(path.read_bytes()), out=row)
    return batch


def _torch_forward(net: torch.nn.Module, batch: np.ndarray, bf16: bool = False) -> np.ndarray:
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        tensor = torch.from_numpy(batch).contiguous(memory_format=torch.channels_last)
        return net(tensor).float().numpy()


@register_engine("torch", tolerance=1e-5)
def torch_engine(bundle: ModelBundle, options: EngineOptions) -> Engine:
    """Eager PyTorch fp32 in channels_last layout: the reference engine."""
    torch.set_num_threads(options.threads)
    net = bundle.net.eval().to(memory_format=torch.channels_last)
    return lambda batch: _torch_forward(net, batch)


@register_engine("torch-bf16", tolerance=0.01)
def torch_bf16_engine(bundle: ModelBundle, options: EngineOptions) -> Engine:
    """Eager PyTorch, channels_last, bf16 autocast (AVX-512 BF16 CPUs and GPUs)."""
    torch.set_num_threads(options.threads)
    net = bundle.net.eval().to(memory_format=torch.channels_last)
    return lambda batch: _torch_forward(net, batch, bf16=True)


ONNX_PACKAGES = (("onnxruntime", "onnxruntime"), ("onnx", "onnx"), ("onnxscript", "onnxscript"))


@register_engine("onnx", tolerance=1e-5, packages=ONNX_PACKAGES)
def onnx_engine(bundle: ModelBundle, options: EngineOptions) -> Engine:
    """ONNX Runtime fp32 on the exported EmbeddingNet (export cached per model)."""
    with _model_dir(options) as directory:
        path = _cached(directory / f"{bundle.fingerprint}.fp32.onnx",
                       lambda target: _export(bundle, target))
        return _ort_runner(path, options.threads)


@register_engine("onnx-int8", tolerance=0.05, packages=ONNX_PACKAGES)
def onnx_int8_engine(bundle: ModelBundle, options: EngineOptions) -> Engine:
    """ONNX Runtime int8: static per-channel QDQ calibrated on real photos (cached per model)."""
    with _model_dir(options) as directory:
        fp32 = _cached(directory / f"{bundle.fingerprint}.fp32.onnx",
                       lambda target: _export(bundle, target))
        int8 = _cached(directory / f"{bundle.fingerprint}.int8.onnx",
                       lambda target: _quantize(bundle, fp32, target))
        return _ort_runner(int8, options.threads)


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
    """``path``, built by ``build(tmp)`` and moved into place atomically when missing."""
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


def _export(bundle: ModelBundle, target: Path) -> None:
    """Export the whole EmbeddingNet with a dynamic batch axis and check it on real images.

    The dynamo exporter specialises the fixed image size, so TF-style "same" padding folds
    into the convolutions (the TorchScript exporter keeps it as runtime Shape/Pad ops,
    measured ~30% slower under ONNX Runtime).
    """
    log.info("exporting model %s to ONNX (once per model)", bundle.name)
    net = bundle.net.eval()
    size = bundle.config.input_size
    example = torch.zeros(2, 3, size, size)
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with _quiet(), torch.no_grad():
            program = torch.onnx.export(
                net, (example,), input_names=["images"], output_names=["embeddings"],
                dynamic_shapes=({0: batch},), dynamo=True, optimize=True, verbose=False,
            )
            program.save(str(target))
    except Exception as exc:  # the exporter raises many types for unsupported modules
        raise EngineError(f"cannot export model {bundle.name} to ONNX: {exc}") from exc
    _verify(bundle, _ort_runner(target, threads=1), "onnx")


CALIBRATION_IMAGES = 200
"""Demo photos that set the int8 activation ranges (the first VERIFY_IMAGES are held out)."""
FLOAT_CONVS = 3
"""Leading convolutions kept in fp32: the stem and the first block at full resolution, where
int8 noise (measured: the embeddings' SQNR fell from 53 to 24 dB there) grows through
every later layer; keeping them halves the drift and costs no measurable speed."""


def _quantize(bundle: ModelBundle, fp32: Path, target: Path) -> None:
    """Static int8 QDQ quantisation of the exported model, checked on held-out photos.

    Per-channel weights, uint8 activations with ranges from a moving average of per-batch
    min/max over real photos (plain min/max let single outliers widen the ranges). Only the
    trunks are quantised, less their first :data:`FLOAT_CONVS` convolutions: pooling, taps,
    fusion, the projection head and the L2 normalisation stay fp32 (cheap, and a shared
    8-bit scale would crush small features next to large ones).
    """
    quantization = importlib.import_module("onnxruntime.quantization")
    shape_inference = importlib.import_module("onnxruntime.quantization.shape_inference")
    onnx = importlib.import_module("onnx")
    log.info("quantising model %s to int8 (once per model)", bundle.name)
    images = reference_images(bundle, CALIBRATION_IMAGES)[VERIFY_IMAGES:]

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
            raise EngineError(f"cannot find the trunk of model {bundle.name} in its ONNX graph")
        float_convs = [node.name for node in trunk if node.op_type == "Conv"][:FLOAT_CONVS]
        with _quiet():
            quantization.quantize_static(
                str(prepared), str(target), Calibration(),
                quant_format=quantization.QuantFormat.QDQ, per_channel=True,
                activation_type=quantization.QuantType.QUInt8,
                weight_type=quantization.QuantType.QInt8,
                calibrate_method=quantization.CalibrationMethod.MinMax,
                nodes_to_quantize=[node.name for node in trunk],
                nodes_to_exclude=float_convs,
                extra_options={"CalibMovingAverage": True},
            )
    _verify(bundle, _ort_runner(target, threads=1), "onnx-int8")


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


def _verify(bundle: ModelBundle, run: Engine, name: str) -> None:
    """Refuse a converted model whose embeddings drift past the engine's tolerance."""
    images = reference_images(bundle, VERIFY_IMAGES)
    distance = float((1.0 - (run(images) * _torch_forward(bundle.net, images)).sum(1)).max())
    tolerance = ENGINES[name].tolerance
    log.info("%s engine for %s: largest cosine distance from eager torch on %d photos: %.2e",
             name, bundle.name, len(images), distance)
    if not distance <= tolerance:
        raise EngineError(
            f"the {name} conversion of model {bundle.name} drifts from the torch reference: "
            f"cosine distance {distance:.2e} on real images exceeds {tolerance:.0e}"
        )


def _ort_runner(path: Path, threads: int) -> Engine:
    """An ONNX Runtime CPU session with deliberate threading.

    ``threads`` intra-op threads and no spin-waiting: idle runtime threads would otherwise
    burn the cores the decoding threads (and other processes) need on a 2-core machine.
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
        return session.run(None, {input_name: np.ascontiguousarray(batch, np.float32)})[0]

    return run
