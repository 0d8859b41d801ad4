"""The one ``Model`` protocol that every kind of model implements, and its calibration.

A model is what turns preprocessed images into vectors. Two kinds exist: a trainable
:class:`~.bundle.ModelBundle` (PyTorch weights; the ONNX engines convert it once and cache
the result) and an exported :class:`~.serving.ServingModel` (ONNX files only, no PyTorch).
Everything that *uses* a model (the engines, the :class:`~.embedder.Embedder`, the CLI and the
service) sees only this protocol, so no caller asks which kind it holds.

This module imports neither torch nor timm.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..core.files import atomic_write
from .errors import BundleError

__all__ = [
    "CALIBRATION_FILE", "COHORT_FILE", "DEDUP_KEY", "HUBNESS_KEY", "REGIONS_FILE", "RERANK_KEY",
    "Model", "ModelFacts", "load_calibration", "update_calibration",
]

log = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"
"""Verification threshold measured by ``lookalike evaluate --write-calibration``. Kept out of
the fingerprinted files, so calibrating a model never orphans the indexes built with it."""

DEDUP_KEY = "dedup"
"""The near-duplicate parameters (``threshold``, ``candidate_cosine``,
``cosine_only_threshold``, ``k``, ``cosine_weight``) measured by ``lookalike dedup-evaluate
--write-calibration``, kept beside the verification threshold because they too hold only for
the weights they were measured with."""

RERANK_KEY = "rerank"
"""The candidate re-ranker measured by cross-validation (``weight`` of the learned regions'
late interaction added to the cosine, and how it was measured; see :mod:`.rerank`), kept here
for the same reason."""
HUBNESS_KEY = "hubness"
"""The plain pair score's hubness correction (``k`` cohort neighbours, and the ``threshold`` at
``target_far`` for ``cosine - (hubness(a) + hubness(b)) / 2``, fitted on out-of-fold scores; see
:mod:`.cohort`). Its own entry with its own threshold, so that a top-level threshold written
later for the plain cosine never meets a correction it was not fitted with."""
REGIONS_FILE = "regions.safetensors"
"""A bundle's learned region map (:mod:`.regions_net`), trained for its weights after the
fact like its calibration, and likewise outside the fingerprinted files."""
COHORT_FILE = "cohort.safetensors"
"""A bundle's cohort (:mod:`.cohort`): its unit embeddings of the images it was trained on,
against which its pair scores correct hubness; outside the fingerprinted files too."""


@dataclass(frozen=True)
class ModelFacts:
    """The preprocessing facts inference needs (timm's ``pretrained_cfg`` idea): the input
    size and normalisation the model was trained with, and the embedding it returns."""

    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    embedding_dim: int


@runtime_checkable
class Model(Protocol):
    """A model that computes one kind of vector, named by its ``fingerprint``.

    ``calibration`` is the validated content of ``calibration.json`` (always holding a float
    ``threshold`` in [-1, 1]) or None. How to run it: :meth:`onnx_file` is the model's own
    exported ONNX file when it has one; :meth:`torch_net` the PyTorch network (built on first
    use; a serving model has none and raises :class:`~.errors.EngineError`).
    """

    name: str
    fingerprint: str
    path: Path | None

    @property
    def facts(self) -> ModelFacts: ...

    @property
    def calibration(self) -> dict[str, Any] | None: ...

    def onnx_file(self, int8: bool) -> Path | None: ...

    def torch_net(self) -> Any: ...


def load_calibration(directory: Path, fingerprint: str) -> dict[str, Any] | None:
    """The model's validated calibration, or None when it has none or one measured on other
    weights. The one reader of ``calibration.json``: a damaged file is a clear
    :class:`~.errors.BundleError` when the model loads, never an error in a request."""
    file = Path(directory) / CALIBRATION_FILE
    if not file.is_file():
        return None
    try:
        calibration = json.loads(file.read_text())
        threshold = float(calibration["threshold"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, UnicodeDecodeError) as exc:
        raise BundleError(
            f"{file} is damaged ({type(exc).__name__}: {exc}): delete it or run "
            "'lookalike evaluate --write-calibration'"
        ) from exc
    if not -1.0 <= threshold <= 1.0:
        raise BundleError(f"{file} has threshold {threshold}, outside the cosine range [-1, 1]")
    if calibration.get("model_fingerprint") != fingerprint:
        log.warning("ignoring %s: it was measured with other weights; re-run calibration", file)
        return None
    if DEDUP_KEY in calibration:
        _check_dedup(file, calibration[DEDUP_KEY])
    if RERANK_KEY in calibration:
        _check_rerank(file, calibration[RERANK_KEY])
    if HUBNESS_KEY in calibration:
        _check_hubness(file, calibration[HUBNESS_KEY])
        _require_cohort(file, "python -m lookalike.evaluation.fold_hubness")
    return {**calibration, "threshold": threshold}


def _check_dedup(file: Path, dedup: Any) -> None:
    """Reject a damaged ``dedup`` entry when the model loads, not in a request."""
    scores = ("threshold", "candidate_cosine", "cosine_only_threshold")
    valid = isinstance(dedup, dict) and all(
        isinstance(dedup.get(name), int | float) and -1.0 <= dedup[name] <= 1.0
        for name in scores) and isinstance(dedup.get("k"), int) and 1 <= dedup["k"] <= 1000 \
        and isinstance(dedup.get("cosine_weight", 0.0), int | float) \
        and 0.0 <= dedup.get("cosine_weight", 0.0) <= 10.0
    if not valid:
        raise BundleError(
            f"{file} has a damaged {DEDUP_KEY!r} entry ({dedup!r}): re-run "
            "'lookalike dedup-evaluate --write-calibration'")


def _check_hubness(file: Path, hubness: Any) -> None:
    """Reject a damaged ``hubness`` entry when the model loads, not in a request."""
    valid = isinstance(hubness, dict) and isinstance(hubness.get("k"), int) and \
        1 <= hubness["k"] <= 10_000 and all(
            isinstance(hubness.get(k), int | float) for k in ("threshold", "target_far")) and \
        -2.0 <= hubness["threshold"] <= 2.0
    if not valid:
        raise BundleError(
            f"{file} has a damaged {HUBNESS_KEY!r} entry ({hubness!r}): it needs a 'k' in "
            "[1, 10000], a 'threshold' in [-2, 2] and a 'target_far'; delete the entry or "
            "measure it again (python -m lookalike.evaluation.fold_hubness)")


def _check_rerank(file: Path, rerank: Any) -> None:
    """Reject a damaged ``rerank`` entry when the model loads, not in a request."""
    weight = rerank.get("weight") if isinstance(rerank, dict) else None
    verification = rerank.get("verification", {}) if isinstance(rerank, dict) else None
    valid = isinstance(verification, dict) and (not verification or all(
        isinstance(verification.get(k), int | float) for k in ("weight", "threshold",
                                                                "target_far"))) and \
        isinstance(verification.get("hubness_k", 0), int) and \
        0 <= verification.get("hubness_k", 0) <= 10_000
    if not isinstance(weight, int | float) or not 0.0 <= weight <= 10.0 or not valid:
        raise BundleError(
            f"{file} has a damaged {RERANK_KEY!r} entry ({rerank!r}): it needs a 'weight' in "
            "[0, 10] (and a 'verification' entry, if any, its 'weight', 'threshold' and "
            "'target_far', and a 'hubness_k' in [0, 10000] if any); delete the entry or "
            "measure it again (benchmarks/RESULTS.md, issue 14)")
    if verification and verification.get("hubness_k", 0):
        _require_cohort(file, "python -m lookalike.evaluation.fold_learned_regions "
                        "--write-rerank MODEL_DIR")


def _require_cohort(file: Path, command: str) -> None:
    """A calibration that corrects hubness needs the cohort beside it: refused at load."""
    if not (file.parent / COHORT_FILE).is_file():
        raise BundleError(f"{file} corrects hubness, but the model has no {COHORT_FILE}; "
                          f"measure it again ({command})")


def update_calibration(directory: Path, fingerprint: str, values: dict[str, Any]) -> Path:
    """Merge ``values`` into the model's ``calibration.json`` (atomically) and return its path:
    the one writer, so that each measurement replaces its own keys and keeps the others'."""
    file = Path(directory) / CALIBRATION_FILE
    current: dict[str, Any] = {}
    if file.is_file():
        try:
            current = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            log.warning("replacing damaged %s", file)
        if not isinstance(current, dict) or current.get("model_fingerprint") != fingerprint:
            current = {}  # damaged, or measured with other weights: none of it holds any more
    merged = {**current, **values, "model_fingerprint": fingerprint}
    if "threshold" not in merged:
        raise BundleError(
            f"{file} needs the verification threshold first: run "
            "'lookalike evaluate --write-calibration' with this model")
    text = json.dumps(merged, indent=2, sort_keys=True) + "\n"
    return atomic_write(file, text)
