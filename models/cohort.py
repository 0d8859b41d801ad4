"""A model's cohort: its unit embeddings of the images it was trained on (issue 14).

A pair score (``/compare``: the cosine, with the calibration's ``hubness`` entry; the
re-ranked score, with ``rerank.verification.hubness_k``) subtracts half of each image's
*hubness*, its mean cosine to the ``k`` nearest cohort vectors (:func:`~lookalike.core.scoring.
hubness`), so that images close to everything stop passing the threshold with everyone. The
cohort is the training images because cross-validation measured it so: each fold's cohort was
the images its model trained on, never the pairs it was scored on. On disk it is int8 with a
scale per vector (0.77 MB for 3,000 x 256), read back exactly as the folds used it.

The re-ranked pair score is corrected by the hubness of *that* score (cosine plus weighted
MaxSim both ways), which needs cohort *regions* too (:class:`CohortRegions`): those of the
images that most often are another image's near neighbour (the ones a hubness is made of),
product-quantized to 32 bytes per region (faiss), so 800 images cost 1.3 MB, not 40 MB.

Like the region map, a cohort holds only for the weights that embedded it, so the file names
the model fingerprint and is refused for any other. This module imports no torch.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.scoring import hubness, unit
from .errors import BundleError
from .model import COHORT_FILE, Model

__all__ = ["REGION_CODE_BYTES", "Cohort", "CohortRegions", "cohort_of"]


REGION_CODE_BYTES = 32
"""Bytes per stored cohort region (product quantization, 8 bits per sub-vector): in
cross-validation 8, 16 and 32 bytes all stayed within 0.001 ROC-AUC of float16 regions."""


@dataclass(frozen=True)
class CohortRegions:
    """The region descriptions of some cohort images: ``rows`` ``(M,)`` into the cohort's
    vectors, their unit ``regions`` ``(M, L, d)`` (as stored: quantized, then decoded) and
    their query-region ``weights`` ``(M, L)`` (each row summing to 1)."""

    rows: np.ndarray
    regions: np.ndarray
    weights: np.ndarray

    def stored(self, code_bytes: int = REGION_CODE_BYTES) -> CohortRegions:
        """These regions as a saved cohort gives them back (quantized, then decoded):
        cross-validation measures its cohorts through this too, so the served correction is
        the measured one."""
        return self.decode(self.rows, *_pq_encode(self.regions, code_bytes),
                           self.weights.astype(np.float16))

    @classmethod
    def decode(cls, rows: np.ndarray, codes: np.ndarray, centroids: np.ndarray,
               weights: np.ndarray) -> CohortRegions:
        """From the stored codes ``(M, L, m)`` and sub-vector ``centroids`` ``(m, 256, d/m)``."""
        parts = [centroids[j][codes[..., j]] for j in range(centroids.shape[0])]
        regions = unit(np.concatenate(parts, axis=-1).astype(np.float32))
        found = weights.astype(np.float32)
        return cls(np.asarray(rows, np.int64), regions, found / found.sum(axis=1, keepdims=True))


def _pq_encode(regions: np.ndarray, code_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """``(M, L, d)`` -> uint8 codes ``(M, L, m)`` and centroids ``(m, 256, d / m)`` of a
    product quantizer trained on the regions themselves (``m``: ``code_bytes``, or the
    largest divisor of ``d`` below it)."""
    import faiss

    flat = np.ascontiguousarray(regions.reshape(-1, regions.shape[-1]), np.float32)
    code_bytes = math.gcd(code_bytes, flat.shape[1])
    quantizer = faiss.ProductQuantizer(flat.shape[1], code_bytes, 8)
    quantizer.train(flat)
    centroids = faiss.vector_to_array(quantizer.centroids).reshape(code_bytes, 256, -1)
    codes = quantizer.compute_codes(flat).reshape(*regions.shape[:2], code_bytes)
    return codes, centroids.astype(np.float32)


@dataclass(frozen=True)
class Cohort:
    """``vectors`` ``(N, D)`` unit embeddings; ``facts`` say what they are (images, recipe);
    ``regions``, when the re-ranked pair score needs them, some of the images' regions."""

    vectors: np.ndarray
    facts: dict[str, Any] = field(default_factory=dict)
    regions: CohortRegions | None = None

    def hubness(self, vectors: np.ndarray, k: int) -> np.ndarray:
        """``(M, D)`` unit vectors -> ``(M,)`` mean cosine to their ``k`` nearest here."""
        return hubness(vectors, self.vectors, k)

    def corrected(self, score: float, a: np.ndarray, b: np.ndarray, k: int) -> float:
        """A pair score of the unit embeddings ``a`` and ``b`` minus half of each one's
        hubness: what the plain pair verdict judges (:mod:`.verdict`; the re-ranked one
        corrects its own score, :func:`~.rerank.combined_hubness`)."""
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
        if self.regions is not None:
            region_codes, centroids = _pq_encode(self.regions.regions, REGION_CODE_BYTES)
            tensors |= {"region_rows": self.regions.rows.astype(np.int32),
                        "region_codes": region_codes, "region_centroids": centroids,
                        "region_weights": self.regions.weights.astype(np.float16)}
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
                stored = {name: handle.get_tensor(name) for name in handle.keys()
                          if name.startswith("region_")}
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
        return cls(_dequantize(codes, scale), facts, _stored_regions(path, stored, len(codes)))


def _stored_regions(path: Path, stored: dict[str, np.ndarray], images: int
                    ) -> CohortRegions | None:
    """The cohort regions in a cohort file's ``region_*`` tensors, if any, checked."""
    if not stored:
        return None
    try:
        rows, codes = stored["region_rows"], stored["region_codes"]
        centroids, weights = stored["region_centroids"], stored["region_weights"]
    except KeyError as exc:
        raise BundleError(f"{path} is damaged: its cohort regions lack {exc}") from exc
    valid = rows.ndim == 1 and codes.dtype == np.uint8 and codes.ndim == 3 and \
        codes.shape[0] == len(rows) > 0 and centroids.ndim == 3 and \
        centroids.shape[:2] == (codes.shape[2], 256) and weights.shape == codes.shape[:2] and \
        ((rows >= 0) & (rows < images)).all() and np.isfinite(centroids).all() and \
        np.isfinite(weights).all() and (weights >= 0).all()
    if not valid:
        raise BundleError(f"{path} is damaged: its cohort regions need rows (M,) within the "
                          "cohort, uint8 codes (M, L, m), centroids (m, 256, d/m) and weights "
                          f"(M, L); it has {rows.shape}, {codes.shape} {codes.dtype}, "
                          f"{centroids.shape} and {weights.shape}")
    return CohortRegions.decode(rows, codes, centroids, weights)


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
