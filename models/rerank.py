"""Re-ranking a query's candidates by the cosine plus learned region late interaction (issue 14).

A candidate's score is ``cosine + weight * maxsim``:

* ``cosine`` is the model's own embedding cosine;
* ``maxsim`` is ColBERT-style late interaction over the model's *learned* region vectors
  (:mod:`.regions_net`: the trunks' 7 x 7 locations through a linear map trained on look-alike
  pairs): each query region's best cosine among the candidate's regions, summed with the
  query regions' learned weights (a softmax over its locations; a map without them: the plain
  mean). TLL likeness is often partial (a hairstyle, a pose, a shape in one corner); matching
  region to region, and weighing the regions that carry a likeness, scores that.

Both come from one pass of the trunks (:class:`~.regions_net.DescribeNet`, or its ONNX export
``rerank.onnx`` on the ONNX engines). In 5-fold cross-validation on the ``accurate`` model it
gains +0.085 ± 0.008 top-1 over the cosine (0.640; the plain mean of the regions gave 0.593 on
the two-trunk model; ``benchmarks/RESULTS.md``, issue 14, "Twelfth session" to "Sixteenth
session") and, as a pair score (MaxSim both ways, minus each image's :func:`combined_hubness`
against the cohort's regions), +0.035 ROC-AUC (0.930; 0.931 over three map seeds).
The weights are measured properties of one model's weights, so they live in the model's
``calibration.json`` (key :data:`~.model.RERANK_KEY`), and the region map beside it
(:data:`~.model.REGIONS_FILE`); a model without both has no re-ranker.

This module imports no torch.
"""

from __future__ import annotations

import json
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..core.scoring import top_k_mean, unit
from .cohort import Cohort, cohort_of
from .embedder import Embedder
from .errors import EngineError
from .export import conversion_dir
from .model import RERANK_KEY

__all__ = ["PAIR_SCORE", "REGIONS", "Layout", "Reranker", "RerankSpec", "VerificationSpec",
           "cohort_scores", "combined_hubness", "maxsim", "reranker_for", "unit"]

REGIONS = "learned-7x7"
"""The kind of regions this version re-ranks with, as a calibration entry records it."""
PAIR_SCORE = "symmetric, combined hubness"
"""The re-ranked pair score this version judges, as its calibration records it: cosine +
weight x MaxSim both ways, minus half of each side's :func:`combined_hubness`."""


@dataclass(frozen=True)
class VerificationSpec:
    """The re-ranked pair score's calibration (``/compare`` with ``rerank``): its own
    ``weight`` (best by AUC), the ``hubness_k`` of its hubness correction against the model's
    cohort (:mod:`.cohort`; 0: none) and the ``threshold`` at ``target_far``, fitted on
    out-of-fold scores; ``entry`` is how it was measured."""

    weight: float
    threshold: float
    target_far: float
    entry: dict[str, Any]
    hubness_k: int = 0


@dataclass(frozen=True)
class RerankSpec:
    """The re-ranker measured for one model: ``weight`` of the late-interaction term when
    ranking a candidate set, and, when measured, its calibrated pair score."""

    weight: float
    verification: VerificationSpec | None = None

    @classmethod
    def of(cls, embedder: Embedder) -> RerankSpec:
        """The model's measured re-ranker, or a clear error naming how to get one."""
        entry = (embedder.bundle.calibration or {}).get(RERANK_KEY)
        if entry is None:
            raise EngineError(
                f"model {embedder.bundle.name!r} has no measured re-ranker ('{RERANK_KEY}' in its "
                "calibration.json); the shipped one is --model accurate")
        if entry.get("regions") != REGIONS:
            raise EngineError(
                f"model {embedder.bundle.name!r} has a re-ranker measured for "
                f"{entry.get('regions')!r} regions; this version re-ranks with {REGIONS!r}: "
                "measure it again (python -m lookalike.evaluation.fold_learned_regions "
                "--write-rerank MODEL_DIR)")
        found = entry.get("verification")
        if found is not None and found.get("pair_score") != PAIR_SCORE:
            raise EngineError(
                f"model {embedder.bundle.name!r} has a pair score calibrated as "
                f"{found.get('pair_score', 'query -> candidate, cosine hubness')!r}; this "
                f"version judges {PAIR_SCORE!r}: measure it again (python -m "
                "lookalike.evaluation.fold_learned_regions --write-rerank MODEL_DIR)")
        verification = None if found is None else VerificationSpec(
            float(found["weight"]), float(found["threshold"]), float(found["target_far"]), found,
            int(found.get("hubness_k", 0)))
        return cls(float(entry["weight"]), verification)


def maxsim(query: np.ndarray, candidates: np.ndarray, symmetric: bool = False,
           weights: np.ndarray | None = None,
           candidate_weights: np.ndarray | None = None) -> np.ndarray:
    """``(R, D)`` unit query regions, ``(K, S, D)`` candidates' -> ``(K,)``: the mean over
    the query's regions (or their sum weighted by ``weights`` ``(R,)``, summing to 1) of the
    best candidate region's cosine; if symmetric, averaged with the same back (each candidate
    region's best query region, weighted by ``candidate_weights`` ``(K, S)`` if given)."""
    # (K, S, R) from one BLAS product over all candidates' regions: twice as fast as one per
    # candidate at 800 x 49 regions (benchmarks/pair_score.py)
    sims = (candidates.reshape(-1, candidates.shape[-1]) @ query.T).reshape(
        *candidates.shape[:2], len(query))
    best = sims.max(axis=1)
    forward = best.mean(axis=1) if weights is None else best @ weights
    if not symmetric:
        return forward
    back = sims.max(axis=2)
    back = back.mean(axis=1) if candidate_weights is None else (back * candidate_weights).sum(1)
    return 0.5 * (forward + back)


def cohort_scores(vectors: np.ndarray, regions: np.ndarray, weights: np.ndarray,
                  cohort: Cohort) -> tuple[np.ndarray, np.ndarray]:
    """``(M, D)`` unit embeddings with their ``(M, L, d)`` regions and ``(M, L)`` weights ->
    their cosines and symmetric MaxSims ``(M, K)`` to the ``K`` cohort images with regions."""
    found = cohort.regions
    if found is None:
        raise EngineError("the model's cohort has no regions, which its pair score's hubness "
                          "needs; measure it again (python -m "
                          "lookalike.evaluation.fold_learned_regions --write-rerank MODEL_DIR)")
    if found.regions.shape[1:] != regions.shape[1:]:
        raise EngineError(f"the model's cohort regions are {found.regions.shape[1:]}, its "
                          f"descriptions' {regions.shape[1:]}; measure the cohort again")
    cosines = np.asarray(vectors, np.float32) @ cohort.vectors[found.rows].T
    lates = np.stack([maxsim(r, found.regions, True, w, found.weights)
                      for r, w in zip(regions, weights, strict=True)])
    return cosines, lates


def combined_hubness(cosines: np.ndarray, lates: np.ndarray, weight: float, k: int
                     ) -> np.ndarray:
    """:func:`cohort_scores` -> ``(M,)``: each image's mean pair score (cosine + ``weight`` x
    symmetric MaxSim) to its ``k`` best-scoring cohort images. The re-ranked pair score
    subtracts half of each side's: CSLS on the score that is judged, not only on its cosine
    (+0.007 ROC-AUC out of fold; ``benchmarks/RESULTS.md``, "Thirteenth session")."""
    return top_k_mean(cosines + weight * lates, k)


@dataclass(frozen=True)
class Layout:
    """How a description ``(D + L * d [+ L],)`` splits: embedding width, regions, region
    width, and whether the query-region weights follow."""

    embedding_dim: int
    regions: int
    region_dim: int
    weighted: bool = False

    @property
    def width(self) -> int:
        return self.embedding_dim + self.regions * (self.region_dim + self.weighted)


class Reranker:
    """Describes images for re-ranking and scores candidates against a query.

    An image's *description* is one float32 vector: its unit embedding, then its ``L`` unit
    region vectors, then (a weighted map) the weights of its regions as a query's in MaxSim.
    :meth:`embedder` wraps :meth:`describe` as an
    :class:`~.embedder.Embedder` whose "vectors" are descriptions, so the file pipeline
    (decoding beside the forward pass, errors per file, progress) is the usual one.
    """

    def __init__(self, embedder: Embedder, run: Callable[[np.ndarray], np.ndarray],
                 layout: Layout, spec: RerankSpec) -> None:
        self.source = embedder
        self.layout = layout
        self.spec = spec
        self._run = run
        self._lock = threading.Lock()

    def describe(self, batch: np.ndarray) -> np.ndarray:
        """``(B, 3, S, S)`` preprocessed images -> ``(B, D + L * d)`` descriptions."""
        if len(batch) == 0:
            return np.zeros((0, self.layout.width), np.float32)
        with self._lock:
            return np.asarray(self._run(np.ascontiguousarray(batch, np.float32)), np.float32)

    def cosines(self, query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """The embeddings' cosines of ``(K, width)`` candidates' descriptions to the query's."""
        dim = self.layout.embedding_dim
        return (candidates[:, :dim] @ query[:dim]).astype(np.float32)

    def regions(self, descriptions: np.ndarray) -> np.ndarray:
        """``(..., width)`` -> ``(..., L, d)`` unit region vectors."""
        layout = self.layout
        start = layout.embedding_dim
        shape = descriptions.shape[:-1] + (layout.regions, layout.region_dim)
        return descriptions[..., start:start + layout.regions * layout.region_dim].reshape(shape)

    def weights(self, descriptions: np.ndarray) -> np.ndarray | None:
        """``(..., width)`` descriptions' region weights ``(..., L)`` as queries, or None (the
        plain mean)."""
        return descriptions[..., -self.layout.regions:] if self.layout.weighted else None

    def late(self, query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """``(width,)`` query description, ``(K, width)`` candidates' -> ``(K,)`` MaxSim."""
        return maxsim(self.regions(query), self.regions(candidates), weights=self.weights(query))

    def scores(self, query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """``(width,)`` query description, ``(K, width)`` candidates' -> ``(K,)``."""
        if len(candidates) == 0:
            return np.zeros(0, np.float32)
        late = self.late(query, candidates)
        return (self.cosines(query, candidates) + self.spec.weight * late).astype(np.float32)

    def pair_score(self, a: np.ndarray, b: np.ndarray) -> tuple[float, VerificationSpec]:
        """The calibrated pair score of two descriptions: cosine plus weight x MaxSim both ways
        (the pair has no query side), minus half of each image's :func:`combined_hubness` when
        the calibration corrects it; and the calibration it is judged by. A clear error when
        the model has none."""
        verification = self.spec.verification
        if verification is None:
            raise EngineError(
                f"model {self.source.bundle.name!r} has a re-ranker for candidate sets but no "
                "calibrated pair score ('verification' in its re-ranker entry)")
        both = np.stack([a, b])
        regions, weights = self.regions(both), self.pair_weights(both)
        late = maxsim(regions[0], regions[1][None], True, weights[0], weights[1][None])[0]
        score = float(self.cosines(a, b[None])[0] + verification.weight * late)
        if verification.hubness_k:
            dim = self.layout.embedding_dim
            hubs = combined_hubness(*cohort_scores(both[:, :dim], regions, weights,
                                                   self.cohort()),
                                    verification.weight, verification.hubness_k)
            score -= 0.5 * float(hubs.sum())
        return score, verification

    def pair_weights(self, descriptions: np.ndarray) -> np.ndarray:
        """``(N, width)`` -> ``(N, L)`` region weights; a plain map's are uniform."""
        found = self.weights(descriptions)
        if found is not None:
            return found
        return np.full((len(descriptions), self.layout.regions), 1.0 / self.layout.regions,
                       np.float32)

    def cohort(self) -> Cohort:
        """The model's cohort, loaded on first use (only the pair score needs it)."""
        return cohort_of(self.source.bundle, self.layout.embedding_dim)

    def embedder(self) -> Embedder:
        """An embedder over the same model and preprocessing whose output is descriptions."""
        source = self.source
        return Embedder(source.bundle, f"{source.engine_name}+rerank",
                        source.preprocessor.max_pixels, source.decode_workers, run=self.describe)


def _torch_describe(embedder: Embedder) -> tuple[Callable[[np.ndarray], np.ndarray], Layout]:
    """Eager PyTorch descriptions (the reference)."""
    import torch

    from .regions_net import DescribeNet, RegionMap

    model = embedder.bundle
    if model.path is None:
        raise EngineError(f"model {model.name!r} has no directory, so no learned regions")
    region_map = RegionMap.load(model.path, model.fingerprint)
    module = DescribeNet(model.torch_net(), region_map).eval()

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(batch)).numpy()

    return run, Layout(embedder.dim, region_map.locations**2, region_map.dim,
                       region_map.weighted)


def _onnx_describe(embedder: Embedder, cache_dir: str | Path | None
                   ) -> tuple[Callable[[np.ndarray], np.ndarray], Layout]:
    """ONNX Runtime descriptions from the model's ``rerank.onnx`` or a cached conversion."""
    from .export import rerank_files
    from .runtime import ort_runner

    with conversion_dir(Path(cache_dir) if cache_dir is not None else None) as directory:
        onnx, facts_file = rerank_files(embedder.bundle, directory)
        facts = json.loads(facts_file.read_text())
        return ort_runner(onnx, threads=2), Layout(
            int(facts["embedding_dim"]), int(facts["locations"]) ** 2, int(facts["region_dim"]),
            bool(facts.get("weighted", False)))


_rerankers: weakref.WeakKeyDictionary[Embedder, Reranker] = weakref.WeakKeyDictionary()
_rerankers_lock = threading.Lock()


def reranker_for(embedder: Embedder, cache_dir: str | Path | None = None) -> Reranker:
    """The embedder's model's measured re-ranker on the embedder's engine (PyTorch, or the
    model's ``rerank.onnx``), built on first use: converting a bundle's costs a minute once
    per model and cache, loading it seconds. A model without one fails before anything runs."""
    spec = RerankSpec.of(embedder)
    with _rerankers_lock:
        reranker = _rerankers.get(embedder)
        if reranker is None or reranker.spec != spec:
            if embedder.engine_name.startswith("torch"):
                run, layout = _torch_describe(embedder)
            else:
                run, layout = _onnx_describe(embedder, cache_dir)
            reranker = _rerankers[embedder] = Reranker(embedder, run, layout, spec)
        return reranker
