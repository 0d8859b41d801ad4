"""Export and quantisation: a bundle's network -> verified ONNX fp32 and int8 files, and the
serving model directory that holds them.

Built on the engine runtime (:mod:`.runtime`: sessions and the drift check); the ONNX engines
(:mod:`.engines`) call :func:`onnx_file` for a model that has no exported file of its own.
Conversions are cached per model fingerprint, so a second start only loads them.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ..core.files import atomic_write, files_sha256
from .errors import BundleError, EngineError
from .model import CALIBRATION_FILE, COHORT_FILE, REGIONS_FILE, Model
from .runtime import VERIFY_IMAGES, ort_runner, quiet, reference_images, torch_runner, verify
from .serving import (
    EXPLAIN_FACTS,
    EXPLAIN_ONNX,
    INT8_FILE,
    ONNX_FILE,
    RERANK_FACTS,
    RERANK_ONNX,
    SERVING_FILE,
    ServingModel,
    load_serving_model,
)

__all__ = ["EXPLAIN_TOLERANCE", "FP32_TOLERANCE", "INT8_TOLERANCE", "RERANK_TOLERANCE",
           "conversion_dir", "explain_files", "export_explain", "export_onnx", "export_rerank",
           "export_serving_model", "onnx_conversions", "onnx_file", "require", "rerank_files"]

log = logging.getLogger(__name__)

FP32_TOLERANCE = 1e-5
"""Largest cosine distance of the fp32 ONNX export from eager PyTorch on real photos."""
INT8_TOLERANCE = 0.05
"""Largest cosine distance of the int8 model from its reference on real photos."""
EXPLAIN_TOLERANCE = 1e-4
"""Largest error of the exported per-location terms from PyTorch's, relative to the largest
embedding value, on real photos."""
RERANK_TOLERANCE = 1e-4
"""Largest coordinate error of the exported re-ranker's unit vectors from PyTorch's."""
EXPORT_PACKAGES = (("torch", "torch"), ("onnxscript", "onnxscript"))


def require(engine: str, module: str, package: str) -> Any:
    """Import ``module`` or raise an :class:`EngineError` saying which package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise EngineError(
            f"engine {engine!r} needs the Python package {package!r}, which is not installed: "
            f"pip install {package} (or choose another engine)"
        ) from exc


def onnx_file(model: Model, directory: Path, int8: bool, engine: str) -> Path:
    """The model's own exported file, or its conversion cached in ``directory``."""
    own = model.onnx_file(int8)
    if own is not None:
        return own
    cached = directory / f"{model.fingerprint}.{'int8' if int8 else 'fp32'}.onnx"
    if cached.is_file():  # no conversion, so no torch
        return cached
    if int8:
        fp32 = onnx_file(model, directory, False, engine)
        return _cached(cached, lambda target: _quantize(model, fp32, target))
    for module, package in EXPORT_PACKAGES:
        require(engine, module, package)
    return _cached(cached, lambda target: export_onnx(model, target))


@contextlib.contextmanager
def conversion_dir(cache_dir: Path | None) -> Iterator[Path]:
    """``cache_dir/engines``, or a temporary directory removed once the session is loaded."""
    if cache_dir is not None:
        directory = Path(cache_dir) / "engines"
        directory.mkdir(parents=True, exist_ok=True)
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix="lookalike-engine-") as tmp:
        yield Path(tmp)


@contextlib.contextmanager
def onnx_conversions(
    model: Model, cache_dir: Path | None, int8: bool = True
) -> Iterator[tuple[Path, Path | None]]:
    """The model's verified fp32 ONNX file and, when ``int8``, its int8 one: converted once
    per ``cache_dir`` (or into a temporary directory), valid inside the ``with`` block."""
    with conversion_dir(cache_dir) as directory:
        yield (onnx_file(model, directory, False, "onnx"),
               onnx_file(model, directory, True, "onnx-int8") if int8 else None)


def _cached(path: Path, build: Callable[[Path], None]) -> Path:
    """``path``, built by ``build(tmp)`` and moved into place atomically (fsynced) when
    missing, so that concurrent or interrupted starts never see half a file."""
    if not path.is_file():
        atomic_write(path, build)
    return path


def export_onnx(model: Model, target: Path) -> None:
    """Export the whole EmbeddingNet to ``target`` with a dynamic batch axis, then check it
    against eager PyTorch on real photos (:class:`EngineError` when it drifts).

    The dynamo exporter specialises the fixed image size, so TF-style "same" padding folds
    into the convolutions; the TorchScript exporter keeps it as run-time Shape/Pad ops,
    measured 1.4x slower under ONNX Runtime.
    """
    import torch

    log.info("exporting model %s to ONNX (once per model)", model.name)
    net = model.torch_net()
    size = model.facts.input_size
    batch = torch.export.Dim("batch", min=1, max=65536)
    try:
        with quiet(), torch.no_grad():
            program = torch.onnx.export(
                net.eval(), (torch.zeros(2, 3, size, size),),
                input_names=["images"], output_names=["embeddings"],
                dynamic_shapes=({0: batch},), dynamo=True, optimize=True, verbose=False,
            )
            program.save(str(target))
    except Exception as exc:  # the exporter raises many types for unsupported modules
        raise EngineError(f"cannot export model {model.name} to ONNX: {exc}") from exc
    verify(model, ort_runner(target, threads=1), torch_runner(net), "onnx", FP32_TOLERANCE)


def explain_files(model: Model, directory: Path) -> tuple[Path, Path]:
    """The model's ``explain.onnx`` and ``explain.json``: its own export's, or converted once
    per fingerprint into ``directory`` (needs torch; :class:`EngineError` when it cannot be,
    e.g. a model outside the exact family)."""
    if model.path is not None and (model.path / EXPLAIN_ONNX).is_file():
        return model.path / EXPLAIN_ONNX, model.path / EXPLAIN_FACTS
    return _converted(model, directory, model.fingerprint, EXPLAIN_ONNX, EXPLAIN_FACTS,
                      export_explain)


def _converted(model: Model, directory: Path, stem: str, onnx_name: str, facts_name: str,
               export: Callable[[Model, Path, Path], None]) -> tuple[Path, Path]:
    """``directory/STEM.onnx_name`` and ``.facts_name``, made by ``export`` when missing."""
    onnx, facts = directory / f"{stem}.{onnx_name}", directory / f"{stem}.{facts_name}"
    if not (onnx.is_file() and facts.is_file()):
        for module, package in EXPORT_PACKAGES:
            require("onnx", module, package)
        export(model, onnx, facts)
    return onnx, facts


def export_explain(model: Model, onnx_target: Path, facts_target: Path) -> None:
    """Export the per-location terms (:class:`~.explain_net.LocationTerms`) to ONNX, check
    them against PyTorch on real photos, and write the constant term and grid beside them."""
    import torch

    from .explain_net import LocationTerms, derive_readout

    log.info("exporting the explanation terms of model %s to ONNX (once per model)", model.name)
    net = model.torch_net().eval()
    images = reference_images(model, VERIFY_IMAGES)
    readout = derive_readout(net, torch.from_numpy(images[:2]))
    module = LocationTerms(net, readout).eval()

    def error(expected: np.ndarray, got: np.ndarray) -> float:
        """Relative to the largest embedding value."""
        scale = float(np.abs(expected.sum(1) + readout.bias).max())
        return float(np.abs(got - expected).max()) / scale

    _export_checked(model, module, onnx_target, "terms", "explanation terms", error,
                    EXPLAIN_TOLERANCE)
    facts = {"grid": readout.grid, "bias": [float(v) for v in readout.bias],
             "fingerprint": model.fingerprint}
    atomic_write(facts_target, json.dumps(facts))


def rerank_files(model: Model, directory: Path) -> tuple[Path, Path]:
    """The model's ``rerank.onnx`` and ``rerank.json`` (embedding and learned regions in one
    pass): its own export's, or converted once per fingerprint and region map into
    ``directory`` (needs torch; :class:`~.errors.BundleError` when the model has no learned
    regions)."""
    if model.path is not None and (model.path / RERANK_ONNX).is_file():
        return model.path / RERANK_ONNX, model.path / RERANK_FACTS
    regions = model.path / REGIONS_FILE if model.path is not None else None
    if regions is None or not regions.is_file():
        raise BundleError(f"model {model.name!r} has no learned regions ({REGIONS_FILE}); "
                          "the shipped ones are --model accurate's")
    stem = f"{model.fingerprint}.{files_sha256(regions)[:16]}"
    return _converted(model, directory, stem, RERANK_ONNX, RERANK_FACTS, export_rerank)


def export_rerank(model: Model, onnx_target: Path, facts_target: Path) -> None:
    """Export the model's :class:`~.regions_net.DescribeNet` to ONNX, check it against
    PyTorch on real photos, and write its layout beside it."""
    from .regions_net import DescribeNet, RegionMap

    log.info("exporting the re-ranker of model %s to ONNX (once per model)", model.name)
    assert model.path is not None
    region_map = RegionMap.load(model.path, model.fingerprint)
    module = DescribeNet(model.torch_net(), region_map).eval()

    def error(expected: np.ndarray, got: np.ndarray) -> float:
        """Of unit vectors: their largest coordinate error."""
        return float(np.abs(got - expected).max())

    _export_checked(model, module, onnx_target, "descriptions", "re-ranker", error,
                    RERANK_TOLERANCE)
    facts = {"fingerprint": model.fingerprint, "embedding_dim": model.facts.embedding_dim,
             "locations": region_map.locations, "region_dim": region_map.dim,
             "weighted": region_map.weighted,
             "regions_sha256": files_sha256(model.path / REGIONS_FILE)}
    atomic_write(facts_target, json.dumps(facts))


def _export_checked(model: Model, module: Any, target: Path, output: str, what: str,
                    error: Callable[[np.ndarray, np.ndarray], float], tolerance: float) -> None:
    """Export ``module`` (images in, ``output`` out, dynamic batch) to ``target`` once, and
    refuse it when its output on real photos drifts from PyTorch's by more than
    ``tolerance`` (``error(expected, got)``)."""
    import torch

    size = model.facts.input_size
    batch = torch.export.Dim("batch", min=1, max=65536)
    images = reference_images(model, VERIFY_IMAGES)

    def build(path: Path) -> None:
        try:
            with quiet(), torch.no_grad():
                program = torch.onnx.export(
                    module, (torch.zeros(2, 3, size, size),), input_names=["images"],
                    output_names=[output], dynamic_shapes=({0: batch},), dynamo=True,
                    optimize=True, verbose=False,
                )
                program.save(str(path))
        except Exception as exc:  # the exporter raises many types for unsupported modules
            raise EngineError(f"cannot export the {what} of {model.name}: {exc}") from exc
        with torch.inference_mode():
            expected = module(torch.from_numpy(images)).numpy()
        found = error(expected, ort_runner(path, threads=1)(images))
        log.info("the ONNX %s of %s: largest error %.2e", what, model.name, found)
        if not found <= tolerance:
            raise EngineError(f"the ONNX {what} of {model.name} drift from PyTorch: "
                              f"{found:.2e} > {tolerance:.0e}")

    _cached(target, build)


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
        with quiet():
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
    # A serving model has no PyTorch network: its fp32 export is the reference.
    reference = (ort_runner(fp32, threads=1) if model.onnx_file(False) is not None
                 else torch_runner(model.torch_net()))
    verify(model, ort_runner(target, threads=1), reference, "onnx-int8", INT8_TOLERANCE)


def _in_trunk(node: Any) -> bool:
    """Whether an exported ONNX node comes from ``EmbeddingNet.trunks`` (the exporter records
    each node's module path in its metadata)."""
    scopes = {prop.key: prop.value for prop in node.metadata_props}.get(
        "pkg.torch.onnx.name_scopes", "[]"
    )
    return any(scope.startswith("trunks.") for scope in ast.literal_eval(scopes))


def export_serving_model(
    model: Model, out: str | Path, cache_dir: str | Path | None = None, int8: bool = True
) -> ServingModel:
    """Export ``model`` to ONNX, and to int8 ONNX when ``int8``, each verified against
    PyTorch on real photos, as a serving model at ``out``. Conversions already made for the
    engines in ``cache_dir`` are reused. ``serving.json`` records no paths of this machine."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with onnx_conversions(model, Path(cache_dir) if cache_dir else None, int8) as (fp32, q8):
        atomic_write(out / ONNX_FILE, lambda target: shutil.copyfile(fp32, target))
        if q8 is not None:
            atomic_write(out / INT8_FILE, lambda target: shutil.copyfile(q8, target))
    if not int8:
        (out / INT8_FILE).unlink(missing_ok=True)
    _export_extras_into(model, out, cache_dir)
    facts = model.facts
    serving = {
        "name": model.name,
        "fingerprint": model.fingerprint,
        "input_size": facts.input_size,
        "mean": list(facts.mean),
        "std": list(facts.std),
        "embedding_dim": facts.embedding_dim,
    }
    atomic_write(out / SERVING_FILE, json.dumps(serving, indent=2, sort_keys=True))
    if model.calibration is not None:
        calibration = _portable(model.calibration)
        atomic_write(out / CALIBRATION_FILE, json.dumps(calibration, indent=2, sort_keys=True))
    return load_serving_model(out)


def _export_extras_into(model: Model, out: Path, cache_dir: str | Path | None) -> None:
    """Copy the exact explanation's files and the re-ranker's (with its cohort) into the
    export, so the torch-free service explains exactly and re-ranks; a model outside the
    exact family gets no explanation files (it will explain by occlusion, and says so), one
    without learned regions no re-ranker."""
    for files, names, missing in (
            (explain_files, (EXPLAIN_ONNX, EXPLAIN_FACTS), "no exact explanation for %s (it "
             "will use occlusion): %s"),
            (rerank_files, (RERANK_ONNX, RERANK_FACTS), "no re-ranker for %s: %s")):
        with conversion_dir(Path(cache_dir) if cache_dir else None) as directory:
            try:
                made = files(model, directory)
            except (BundleError, EngineError) as exc:
                log.warning(missing, model.name, exc)
                for name in names:
                    (out / name).unlink(missing_ok=True)
                continue
            if made[0].parent != out:
                for source, name in zip(made, names, strict=True):
                    atomic_write(out / name, lambda target, s=source: shutil.copyfile(s, target))
    # The pair scores' cohort is data, not a conversion: copied as it is.
    cohort = model.path / COHORT_FILE if model.path is not None else None
    if cohort is not None and cohort.is_file() and cohort.parent != out:
        atomic_write(out / COHORT_FILE, lambda target: shutil.copyfile(cohort, target))


def _portable(value: Any) -> Any:
    """``value`` with every absolute path replaced by its file name: an exported model
    travels to other machines, where this machine's paths mean nothing."""
    if isinstance(value, dict):
        return {key: _portable(item) for key, item in value.items()}
    if isinstance(value, str) and Path(value).is_absolute():
        return Path(value).name
    return value
