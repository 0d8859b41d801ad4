"""Why two images match: their cosine split into region-to-region contributions.

Exact method (the default model's family, see :mod:`.explain_net`): each embedding before
normalisation is ``z = b + sum_l e_l`` over the regions ``l`` of a common G x G grid over the
model's input (the centre square of the image), so with ``n = |z_a| |z_b|``

    cosine = b.b / n  +  sum_l e_a,l . b / n  +  sum_m b . e_b,m / n  +  sum_l,m e_a,l . e_b,m / n

The last sum is the region-pair matrix ("this region of the query <-> that region of the
match"); each pair's term is shared half and half between its two regions, and each region's
term with the constant goes to its own side, so ``constant + sum(query_map) +
sum(match_map) == cosine`` exactly. The terms come from PyTorch (engine ``torch``) or from the
exported ``explain.onnx`` (the ONNX engines, fp32), so a torch-free service explains too.

Any other model gets the occlusion approximation, labelled as one: a region's value is how
much the cosine drops when it is greyed out (the input's mean), and a pair's value the product
of the two embedding changes. Those maps do not add up to the score.

This module imports no torch.
"""

from __future__ import annotations

import json
import logging
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .embedder import Embedder
from .errors import EngineError
from .export import conversion_dir
from .model import Model
from .serving import EXPLAIN_FACTS, EXPLAIN_ONNX

__all__ = ["EXACT", "EXPLAIN_FACTS", "EXPLAIN_ONNX", "OCCLUSION", "Explainer", "Explanation",
           "RegionPair", "explainer_for", "mask_regions", "split"]

log = logging.getLogger(__name__)

EXACT = "exact"
OCCLUSION = "occlusion"
OCCLUSION_GRID = 7
"""Regions per side for the occlusion approximation (2 x 49 extra forward passes a pair)."""
TOP_PAIRS = 8


@dataclass(frozen=True)
class RegionPair:
    """One cell of the query's grid, one of the match's, and their joint contribution."""

    query: tuple[int, int]
    match: tuple[int, int]
    contribution: float


@dataclass(frozen=True)
class Explanation:
    """One score explained. Maps are ``(grid, grid)`` over the model's input square."""

    method: str
    engine: str
    score: float
    grid: int
    query_map: np.ndarray
    match_map: np.ndarray
    pairs: np.ndarray
    """``(grid*grid, grid*grid)`` region-pair contributions, row-major cells."""
    constant: float | None
    """``b.b / n`` (exact method); None for occlusion."""

    @property
    def exact(self) -> bool:
        return self.method == EXACT

    def top_pairs(self, count: int = TOP_PAIRS) -> list[RegionPair]:
        """The pairs that add most to the score, strongest first."""
        flat = np.argsort(self.pairs, axis=None)[::-1][:count]
        rows, cols = np.unravel_index(flat, self.pairs.shape)
        return [
            RegionPair(divmod(int(r), self.grid), divmod(int(c), self.grid),
                       float(self.pairs[r, c]))
            for r, c in zip(rows, cols, strict=True)
        ]

    def total(self) -> float:
        """What the exact split adds up to (the score, within float rounding)."""
        return float((self.constant or 0.0) + self.query_map.sum() + self.match_map.sum())

    @property
    def note(self) -> str:
        if self.exact:
            return ("exact: constant + sum(query_map) + sum(match_map) = score; a pair's "
                    "contribution is split half and half between its two regions")
        return ("approximation (occlusion): a region's value is the drop in score when it is "
                "greyed out; the maps do not add up to the score")


def split(
    terms_a: np.ndarray, terms_b: np.ndarray, bias: np.ndarray, grid: int, engine: str
) -> Explanation:
    """The exact split of the cosine of ``b + sum(terms_a)`` and ``b + sum(terms_b)``
    (terms ``(grid*grid, D)``), in float64."""
    a, b, bias = terms_a.astype(np.float64), terms_b.astype(np.float64), bias.astype(np.float64)
    za, zb = bias + a.sum(0), bias + b.sum(0)
    norm = float(np.linalg.norm(za) * np.linalg.norm(zb)) or 1.0
    pairs = a @ b.T / norm
    query = pairs.sum(1) / 2 + a @ bias / norm
    match = pairs.sum(0) / 2 + b @ bias / norm
    return Explanation(EXACT, engine, float(za @ zb / norm), grid,
                       query.reshape(grid, grid), match.reshape(grid, grid), pairs,
                       float(bias @ bias / norm))


def mask_regions(image: np.ndarray, regions: np.ndarray, grid: int) -> np.ndarray:
    """A copy of preprocessed ``image`` ``(3, S, S)`` with the given cells (row-major indices
    of a ``grid`` x ``grid`` layout) set to 0: the normalisation's mean colour."""
    out = image.copy()
    size = image.shape[-1]
    edges = [round(i * size / grid) for i in range(grid + 1)]
    for region in np.atleast_1d(regions):
        row, col = divmod(int(region), grid)
        out[:, edges[row] : edges[row + 1], edges[col] : edges[col + 1]] = 0.0
    return out


class Explainer:
    """Explains scores of an :class:`~.embedder.Embedder`'s model on its engine.

    Exact on the torch engine (PyTorch terms) and the ONNX engines (``explain.onnx``, fp32:
    the model's own export, or converted once per fingerprint into ``cache_dir``); occlusion,
    labelled, for a model outside the family or an export made without ``explain.onnx``.
    Thread-safe: the service calls it from its thread pool.
    """

    def __init__(
        self, embedder: Embedder, cache_dir: str | Path | None = None, occlusion: bool = False
    ) -> None:
        """``occlusion=True`` uses the approximation even where the exact split exists (to
        compare the two)."""
        self.embedder = embedder
        self.reason = ""
        self._lock = threading.Lock()
        self._terms: Any = None
        self.bias = np.zeros(0)
        self.grid = OCCLUSION_GRID
        torch_engine = embedder.engine_name.startswith("torch")
        self.engine = "torch" if torch_engine else "onnx"
        self.method, self.reason = OCCLUSION, "occlusion was asked for"
        if occlusion:
            self.engine = embedder.engine_name
            return
        try:
            if torch_engine:
                self._terms, self.bias, self.grid = _torch_terms(embedder.bundle)
            else:
                self._terms, self.bias, self.grid = _onnx_terms(embedder.bundle, cache_dir)
            self.method = EXACT
        except EngineError as exc:
            self.engine, self.reason = embedder.engine_name, str(exc)
            log.warning("explanations of %s use occlusion (an approximation): %s",
                        embedder.bundle.name, exc)

    @property
    def exact(self) -> bool:
        return self.method == EXACT

    def terms(self, batch: np.ndarray) -> np.ndarray:
        """``(B, 3, S, S)`` preprocessed images -> their exact per-location terms
        ``(B, grid*grid, D)``, whose sum plus :attr:`bias` is each embedding before
        normalisation (the exact method only)."""
        if not self.exact:
            raise EngineError(f"{self.embedder.bundle.name!r} has no exact location terms "
                              f"here: {self.reason}")
        with self._lock:
            return np.asarray(self._terms(np.ascontiguousarray(batch, np.float32)))

    def explain(self, query: np.ndarray, match: np.ndarray) -> Explanation:
        """Explain the cosine of two preprocessed images ``(3, S, S)``."""
        batch = np.stack([query, match]).astype(np.float32)
        if self.exact:
            terms = self.terms(batch)
            return split(terms[0], terms[1], self.bias, self.grid, self.engine)
        return self._occlusion(batch)

    def _occlusion(self, batch: np.ndarray) -> Explanation:
        grid, cells = self.grid, np.arange(self.grid**2)
        masked = np.stack([mask_regions(image, cell, grid) for image in batch for cell in cells])
        run = self.embedder.embed_arrays
        ea, eb = run(batch).astype(np.float64)
        drops = run(masked).astype(np.float64)
        da, db = ea - drops[: len(cells)], eb - drops[len(cells) :]
        return Explanation(OCCLUSION, self.engine, float(ea @ eb), grid,
                           (da @ eb).reshape(grid, grid), (db @ ea).reshape(grid, grid),
                           da @ db.T, None)


def _torch_terms(model: Model) -> tuple[Any, np.ndarray, int]:
    """Eager PyTorch terms (the reference)."""
    import torch

    from .explain_net import LocationTerms, derive_readout
    from .runtime import reference_images

    net = model.torch_net().eval()
    readout = derive_readout(net, torch.from_numpy(reference_images(model, 2)))
    module = LocationTerms(net, readout)

    def run(batch: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return module(torch.from_numpy(batch)).numpy()

    return run, readout.bias, readout.grid


def _onnx_terms(model: Model, cache_dir: str | Path | None) -> tuple[Any, np.ndarray, int]:
    """ONNX Runtime terms from the model's ``explain.onnx`` or a cached conversion."""
    from .export import explain_files
    from .runtime import ort_runner

    with conversion_dir(Path(cache_dir) if cache_dir is not None else None) as directory:
        onnx, facts_file = explain_files(model, directory)
        facts = json.loads(facts_file.read_text())
        return (ort_runner(onnx, threads=2), np.asarray(facts["bias"], np.float64),
                int(facts["grid"]))


_explainers: weakref.WeakKeyDictionary[Embedder, Explainer] = weakref.WeakKeyDictionary()
_explainers_lock = threading.Lock()


def explainer_for(embedder: Embedder, cache_dir: str | Path | None = None) -> Explainer:
    """The embedder's one explainer, built on first use: deriving the split (torch) or loading
    ``explain.onnx`` costs seconds, converting a bundle's once per model and cache."""
    with _explainers_lock:
        explainer = _explainers.get(embedder)
        if explainer is None:
            explainer = _explainers[embedder] = Explainer(embedder, cache_dir)
        return explainer
