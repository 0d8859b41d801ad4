"""A model's cohort: its unit embeddings of the images it was trained on (issue 14).

The re-ranked pair score (``/compare`` with ``rerank``) subtracts half of each image's
*hubness*, its mean cosine to the ``k`` nearest cohort vectors (:func:`~lookalike.core.scoring.
hubness`), so that images close to everything stop passing the threshold with everyone. The
cohort is the training images because cross-validation measured it so: each fold's cohort was
the images its model trained on, never the pairs it was scored on.

Like the region map, a cohort holds only for the weights that embedded it, so the file names
the model fingerprint and is refused for any other. This module imports no torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..core.scoring import hubness, unit
from .errors import BundleError
from .model import COHORT_FILE

__all__ = ["Cohort"]


@dataclass(frozen=True)
class Cohort:
    """``vectors`` ``(N, D)`` unit embeddings; ``facts`` say what they are (images, recipe)."""

    vectors: np.ndarray
    facts: dict[str, Any] = field(default_factory=dict)

    def hubness(self, vectors: np.ndarray, k: int) -> np.ndarray:
        """``(M, D)`` unit vectors -> ``(M,)`` mean cosine to their ``k`` nearest here."""
        return hubness(vectors, self.vectors, k)

    def save(self, directory: Path, fingerprint: str) -> Path:
        """Write :data:`~.model.COHORT_FILE` into the bundle ``directory`` (atomically, float16:
        a hubness is a mean of ``k`` cosines, which float16 moves by < 1e-3)."""
        from safetensors.numpy import save_file

        from ..core.files import atomic_write

        metadata = {"model_fingerprint": fingerprint, "facts": json.dumps(self.facts)}
        tensors = {"vectors": self.vectors.astype(np.float16)}
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
                vectors = handle.get_tensor("vectors").astype(np.float32)
            facts = json.loads(metadata.get("facts", "{}"))
            embedded_by = metadata["model_fingerprint"]
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as exc:
            raise BundleError(f"{path} is damaged ({type(exc).__name__}: {exc})") from exc
        if vectors.ndim != 2 or vectors.shape[1] != dim or len(vectors) == 0 or \
                not np.isfinite(vectors).all():
            raise BundleError(f"{path} is damaged: it needs (N, {dim}) finite vectors, "
                              f"it has {vectors.shape}")
        if embedded_by != fingerprint:
            raise BundleError(f"{path} was embedded by other weights ({embedded_by[:12]}); "
                              "measure it again for this model")
        return cls(unit(vectors), facts)
