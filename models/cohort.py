"""A model's cohort: its unit embeddings of the images it was trained on (issue 14).

A pair score (``/compare``: the cosine, with the calibration's ``hubness`` entry; the
re-ranked score, with ``rerank.verification.hubness_k``) subtracts half of each image's
*hubness*, its mean cosine to the ``k`` nearest cohort vectors (:func:`~lookalike.core.scoring.
hubness`), so that images close to everything stop passing the threshold with everyone. The
cohort is the training images because cross-validation measured it so: each fold's cohort was
the images its model trained on, never the pairs it was scored on. On disk it is int8 with a
scale per vector (0.77 MB for 3,000 x 256), read back exactly as the folds used it.

Like the region map, a cohort holds only for the weights that embedded it, so the file names
the model fingerprint and is refused for any other. This module imports no torch.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.scoring import hubness, unit
from .errors import BundleError
from .model import COHORT_FILE, Model

__all__ = ["Cohort", "cohort_of"]


@dataclass(frozen=True)
class Cohort:
    """``vectors`` ``(N, D)`` unit embeddings; ``facts`` say what they are (images, recipe)."""

    vectors: np.ndarray
    facts: dict[str, Any] = field(default_factory=dict)

    def hubness(self, vectors: np.ndarray, k: int) -> np.ndarray:
        """``(M, D)`` unit vectors -> ``(M,)`` mean cosine to their ``k`` nearest here."""
        return hubness(vectors, self.vectors, k)

    def corrected(self, score: float, a: np.ndarray, b: np.ndarray, k: int) -> float:
        """A pair score of the unit embeddings ``a`` and ``b`` minus half of each one's
        hubness: what both pair verdicts judge (:mod:`.verdict`, :mod:`.rerank`)."""
        return score - 0.5 * float(self.hubness(np.stack([a, b]), k).sum())

    @staticmethod
    def as_stored(vectors: np.ndarray) -> np.ndarray:
        """``vectors`` as a saved cohort gives them back: int8 with one scale per vector, then
        unit length. Cross-validation measures its cohorts through this too, so the served
        correction is the measured one (it moves a hubness by ~1e-3)."""
        return _dequantize(*_quantize(vectors))

    def save(self, directory: Path, fingerprint: str) -> Path:
        """Write :data:`~.model.COHORT_FILE` into the bundle ``directory`` (atomically): int8
        and a scale per vector, a quarter of float32, as :meth:`as_stored` reads them."""
        from safetensors.numpy import save_file

        from ..core.files import atomic_write

        metadata = {"model_fingerprint": fingerprint, "facts": json.dumps(self.facts)}
        codes, scale = _quantize(self.vectors)
        tensors = {"codes": codes, "scale": scale}
        return atomic_write(Path(directory) / COHORT_FILE,
                            lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    @classmethod
    def load(cls, directory: Path, fingerprint: str, dim: int) -> Cohort:
        """The bundle's cohort of ``dim``-d vectors; :class:`~.errors.BundleError` when it is
        missing, damaged or embedded by other weights."""
        from safetensors import SafetensorError, safe_open

        path = Path(directory) / COHORT_FILE
        if not path.is_file():
            raise BundleError(f"model {Path(directory).name!r} has no cohort ({COHORT_FILE}), "
                              "which its calibrated pair score needs; measure it again "
                              "(python -m lookalike.evaluation.fold_learned_regions "
                              "--write-rerank MODEL_DIR)")
        try:
            with safe_open(str(path), framework="numpy") as handle:
                metadata = handle.metadata() or {}
                codes, scale = handle.get_tensor("codes"), handle.get_tensor("scale")
            facts = json.loads(metadata.get("facts", "{}"))
            embedded_by = metadata["model_fingerprint"]
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as exc:
            raise BundleError(f"{path} is damaged ({type(exc).__name__}: {exc})") from exc
        if codes.dtype != np.int8 or codes.ndim != 2 or codes.shape[1] != dim or \
                len(codes) == 0 or scale.shape != (len(codes),) or \
                not (np.isfinite(scale).all() and (scale > 0).all()):
            raise BundleError(f"{path} is damaged: it needs (N, {dim}) int8 codes and N positive "
                              f"scales, it has {codes.shape} {codes.dtype} and {scale.shape}")
        if embedded_by != fingerprint:
            raise BundleError(f"{path} was embedded by other weights ({embedded_by[:12]}); "
                              "measure it again for this model")
        return cls(_dequantize(codes, scale), facts)


def _quantize(vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(N, D)`` -> int8 codes and float32 scales (each row's largest magnitude / 127)."""
    vectors = np.asarray(vectors, np.float32)
    scale = np.maximum(np.abs(vectors).max(axis=1), 1e-12) / 127.0
    return np.round(vectors / scale[:, None]).astype(np.int8), scale.astype(np.float32)


def _dequantize(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return unit(codes.astype(np.float32) * scale[:, None])


_cohorts: dict[tuple[str, str], Cohort] = {}
_cohorts_lock = threading.Lock()


def cohort_of(model: Model, dim: int) -> Cohort:
    """The model's cohort, loaded once per model directory and fingerprint (a model's files do
    not change under a fingerprint; a swapped-in model has its own)."""
    if model.path is None:
        raise BundleError(f"model {model.name!r} has no directory, so no cohort")
    key = (str(model.path), model.fingerprint)
    with _cohorts_lock:
        if key not in _cohorts:
            _cohorts[key] = Cohort.load(model.path, model.fingerprint, dim)
        return _cohorts[key]
