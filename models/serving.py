"""Serving models: a model exported for inference without PyTorch.

A serving model is a directory with ``serving.json`` (the facts inference needs: input size,
normalisation, embedding dimension, and the fingerprint of the bundle it came from),
``model.onnx``, usually ``model.int8.onnx`` (what the default ``onnx-int8`` engine runs, so
that a server never quantises at start-up), and the bundle's ``calibration.json`` when it has
one. It carries the source bundle's fingerprint because it computes the same vectors (the
export is checked against the PyTorch reference), so an index built with the bundle is
served by its export unchanged. :mod:`.export` writes one.

This module imports neither torch nor timm: the serving container has neither.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import BundleError, EngineError
from .model import ModelFacts, load_calibration

__all__ = ["EXPLAIN_FACTS", "EXPLAIN_ONNX", "INT8_FILE", "ONNX_FILE", "RERANK_FACTS",
           "RERANK_ONNX", "SERVING_FILE",
           "ServingModel", "is_serving_model", "load_serving_model"]

SERVING_FILE = "serving.json"
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
EXPLAIN_ONNX = "explain.onnx"
"""Per-location embedding terms for exact explanations (see models/explain.py), when the
model's family allows them."""
EXPLAIN_FACTS = "explain.json"
RERANK_ONNX = "rerank.onnx"
"""The re-ranker's descriptions (embedding and learned regions, see models/regions_net.py),
when the model has learned regions."""
RERANK_FACTS = "rerank.json"


@dataclass(frozen=True)
class ServingModel:
    """An exported model (a :class:`~.model.Model` that runs on the ONNX engines only)."""

    path: Path
    name: str
    fingerprint: str
    facts: ModelFacts
    calibration: dict[str, Any] | None

    @property
    def onnx_path(self) -> Path:
        return self.path / ONNX_FILE

    @property
    def int8_path(self) -> Path | None:
        """The exported int8 model, if the export made one."""
        path = self.path / INT8_FILE
        return path if path.is_file() else None

    def onnx_file(self, int8: bool) -> Path | None:
        """The exported file for the engine: int8 when asked and present, else None (the
        engine quantises the fp32 export); fp32 always exists."""
        return self.int8_path if int8 else self.onnx_path

    def torch_net(self) -> Any:
        raise EngineError(
            f"engine 'torch' needs a model bundle with PyTorch weights; {self.name} is a "
            "serving model (ONNX only): use --engine onnx or onnx-int8"
        )


def is_serving_model(path: str | Path) -> bool:
    return (Path(path) / SERVING_FILE).is_file()


def load_serving_model(path: str | Path) -> ServingModel:
    """Read an exported model's facts and calibration (both validated here, once)."""
    path = Path(path)
    try:
        facts = json.loads((path / SERVING_FILE).read_text())
        mean, std = tuple(float(v) for v in facts["mean"]), tuple(float(v) for v in facts["std"])
        if len(mean) != 3 or len(std) != 3:
            raise ValueError("mean and std need three values")
        model_facts = ModelFacts(
            input_size=int(facts["input_size"]),
            mean=mean,  # type: ignore[arg-type]
            std=std,  # type: ignore[arg-type]
            embedding_dim=int(facts["embedding_dim"]),
        )
        name, fingerprint = str(facts["name"]), str(facts["fingerprint"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise BundleError(f"{path} is not a valid serving model: {exc}") from exc
    if not (path / ONNX_FILE).is_file():
        raise BundleError(f"serving model {path} has no {ONNX_FILE}")
    return ServingModel(path, name, fingerprint, model_facts, load_calibration(path, fingerprint))
