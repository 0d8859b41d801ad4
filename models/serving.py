"""Serving models: a model exported for inference without PyTorch.

A serving model is a directory with ``serving.json`` (the facts inference needs: input size,
normalisation, embedding dimension, and the fingerprint of the bundle it came from),
``model.onnx``, usually ``model.int8.onnx`` (what the default ``onnx-int8`` engine runs, so
that a server never quantises at start-up), and the bundle's ``calibration.json`` when it has
one. It carries the source
bundle's fingerprint because it computes the same vectors (the export is checked against the
PyTorch reference), so an index built with the bundle is served by its export unchanged.

This module imports neither torch nor timm: the serving container has neither.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import BundleError

if TYPE_CHECKING:
    from .bundle import ModelBundle

__all__ = ["SERVING_FILE", "ServingModel", "load_serving_model", "export_serving_model",
           "resolve_any_model", "is_serving_model"]

SERVING_FILE = "serving.json"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
CALIBRATION_FILE = "calibration.json"


@dataclass(frozen=True)
class ServingFacts:
    """The part of a model config that inference needs (mirrors ``EmbeddingConfig``)."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embedding_dim: int


@dataclass(frozen=True)
class ServingModel:
    """An exported model: same ``name``/``fingerprint``/``config`` facts as a ModelBundle."""

    path: Path
    name: str
    fingerprint: str
    config: ServingFacts
    calibration: dict[str, Any] | None

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def int8_path(self) -> Path | None:
        """The exported int8 model, if the export made one."""
        path = self.path / INT8_FILE
        return path if path.is_file() else None


def is_serving_model(path: str | Path) -> bool:
    return (Path(path) / SERVING_FILE).is_file()


def load_serving_model(path: str | Path) -> ServingModel:
    path = Path(path)
    try:
        facts = json.loads((path / SERVING_FILE).read_text())
        config = ServingFacts(
            input_size=int(facts["input_size"]),
            mean=tuple(facts["mean"]),
            std=tuple(facts["std"]),
            embedding_dim=int(facts["embedding_dim"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{path} is not a valid serving model: {exc}") from exc
    if not (path / ONNX_FILE).is_file():
        raise BundleError(f"serving model {path} has no {ONNX_FILE}")
    calibration_file = path / CALIBRATION_FILE
    calibration = json.loads(calibration_file.read_text()) if calibration_file.is_file() else None
    return ServingModel(path, facts["name"], facts["fingerprint"], config, calibration)


def export_serving_model(
    bundle: ModelBundle, out: str | Path, cache_dir: str | Path | None = None, int8: bool = True
) -> ServingModel:
    """Export ``bundle`` to ONNX, and to int8 ONNX when ``int8``, each verified against
    PyTorch on real photos, as a serving model at ``out``. Conversions already made for the
    engines in ``cache_dir`` are reused."""
    from .engines import onnx_conversions

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with onnx_conversions(bundle, Path(cache_dir) if cache_dir else None, int8) as (fp32, q8):
        shutil.copyfile(fp32, out / ONNX_FILE)
        if q8 is not None:
            shutil.copyfile(q8, out / INT8_FILE)
    if not int8:
        (out / INT8_FILE).unlink(missing_ok=True)
    config = bundle.config
    facts = {
        "name": bundle.name,
        "fingerprint": bundle.fingerprint,
        "input_size": config.input_size,
        "mean": list(config.mean),
        "std": list(config.std),
        "embedding_dim": config.embedding_dim,
        "source": str(bundle.path) if bundle.path else None,
    }
    (out / SERVING_FILE).write_text(json.dumps(facts, indent=2, sort_keys=True))
    if bundle.path is not None and (bundle.path / CALIBRATION_FILE).is_file():
        shutil.copy(bundle.path / CALIBRATION_FILE, out / CALIBRATION_FILE)
    return load_serving_model(out)


def resolve_any_model(
    model: str | Path | None, cache_dir: str | Path
) -> ModelBundle | ServingModel:
    """A serving model directory loads without torch; anything else goes to ``resolve_model``."""
    if model is not None and is_serving_model(model):
        return load_serving_model(model)
    from .bundle import resolve_model

    return resolve_model(model, cache_dir)
