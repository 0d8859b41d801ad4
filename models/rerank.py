"""Re-ranking a query's candidates by region late interaction on a flip-TTA cosine (issue 14).

A candidate's score is ``cosine_tta + weight * maxsim``:

* ``cosine_tta`` is the cosine of flip test-time-augmented embeddings (each image's embedding
  plus its mirror's, normalised);
* ``maxsim`` is ColBERT-style late interaction over the model's exact per-location terms (the
  ones ``/explain`` splits a cosine with, :class:`~.explain_net.LocationTerms`): the mean over
  the query's regions of the best cosine among the candidate's regions. TLL likeness is often
  partial (a hairstyle, a pose, a shape in one corner); matching region to region scores that.

Both come from one forward pass of the location terms over the image and its mirror: the terms
plus the readout's bias *are* the embedding before normalisation. Neither part helped the
``accurate`` model alone; together they gained +0.015 ± 0.003 top-1 in 5-fold
cross-validation, in every fold (``benchmarks/RESULTS.md``, issue 14 "Third session"). The
weight is a measured property of one model's weights, so it lives in the model's
``calibration.json`` (key :data:`~.model.RERANK_KEY`); a model without one has no re-ranker.

This module imports no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .embedder import Embedder
from .errors import EngineError
from .explain import Explainer, explainer_for
from .model import RERANK_KEY

__all__ = ["Reranker", "RerankSpec", "maxsim", "reranker_for", "unit"]


@dataclass(frozen=True)
class RerankSpec:
    """The re-ranker measured for one model: ``weight`` of the late-interaction term."""

    weight: float

    @classmethod
    def of(cls, embedder: Embedder) -> RerankSpec:
        """The model's measured re-ranker, or a clear error naming how to get one."""
        entry = (embedder.bundle.calibration or {}).get(RERANK_KEY)
        if entry is None:
            raise EngineError(
                f"model {embedder.bundle.name!r} has no measured re-ranker ('{RERANK_KEY}' in its "
                "calibration.json); the shipped one is --model accurate")
        return cls(weight=float(entry["weight"]))


def maxsim(query: np.ndarray, candidates: np.ndarray, symmetric: bool = False) -> np.ndarray:
    """``(R, D)`` unit query regions, ``(K, S, D)`` candidates' -> ``(K,)``: the mean over
    the query's regions of the best candidate region's cosine (and back, if symmetric)."""
    sims = np.matmul(candidates, query.T)  # (K, S, R), one BLAS product per candidate
    forward = sims.max(axis=1).mean(axis=1)
    return 0.5 * (forward + sims.max(axis=2).mean(axis=1)) if symmetric else forward


def unit(x: np.ndarray) -> np.ndarray:
    """``x`` scaled to unit length along its last axis (any shape; zero vectors stay zero)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


class Reranker:
    """Describes images for re-ranking and scores candidates against a query.

    An image's *description* is one ``(1 + R, D)`` float32 array: row 0 its flip-TTA unit
    embedding, rows 1.. its ``R`` unit region vectors. :meth:`embedder` wraps it as an
    :class:`~.embedder.Embedder` whose "vectors" are descriptions, so the file pipeline
    (decoding beside the forward pass, errors per file, progress) is the usual one.
    """

    def __init__(self, explainer: Explainer, spec: RerankSpec) -> None:
        if not explainer.exact:
            raise EngineError(
                f"re-ranking needs the model's exact location terms, which "
                f"{explainer.embedder.bundle.name!r} has not here: {explainer.reason}")
        self.explainer = explainer
        self.spec = spec

    def describe(self, batch: np.ndarray) -> np.ndarray:
        """``(B, 3, S, S)`` preprocessed images -> ``(B, 1 + R, D)`` descriptions."""
        if len(batch) == 0:
            return np.zeros((0, self.explainer.grid**2 + 1, self.explainer.embedder.dim),
                            np.float32)
        mirrored = np.ascontiguousarray(batch[..., ::-1])
        terms = self.explainer.terms(np.concatenate([batch, mirrored]))
        bias = self.explainer.bias
        plain, mirror = terms[: len(batch)], terms[len(batch):]
        embedding = unit(unit(bias + plain.sum(1)) + unit(bias + mirror.sum(1)))
        return np.concatenate([embedding[:, None], unit(plain)], axis=1).astype(np.float32)

    def scores(self, query: np.ndarray, candidates: np.ndarray) -> np.ndarray:
        """``(1 + R, D)`` query description, ``(K, 1 + R, D)`` candidates' -> ``(K,)``."""
        if len(candidates) == 0:
            return np.zeros(0, np.float32)
        cosine = candidates[:, 0] @ query[0]
        return (cosine + self.spec.weight * maxsim(query[1:], candidates[:, 1:])).astype(
            np.float32)

    def embedder(self) -> Embedder:
        """An embedder over the same model and preprocessing whose output is descriptions."""
        source = self.explainer.embedder
        return Embedder(source.bundle, f"{source.engine_name}+rerank",
                        source.preprocessor.max_pixels, source.decode_workers, run=self.describe)


def reranker_for(embedder: Embedder, cache_dir: str | Path | None = None) -> Reranker:
    """The embedder's model's measured re-ranker, on the embedder's engine (exact location
    terms from PyTorch or from ``explain.onnx``)."""
    spec = RerankSpec.of(embedder)
    return Reranker(explainer_for(embedder, cache_dir), spec)
