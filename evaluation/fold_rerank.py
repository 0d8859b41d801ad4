"""Re-rankers and test-time variants measured on the cross-validation folds (issue 14).

``lookalike train --cv K --keep-fold-models`` leaves, per fold, the fold model's validation
vectors and candidate sets (``fold-K.npz``) and its trained part (``fold-K.head.safetensors``:
standardisation and linear head; the trunks are frozen ImageNet weights). With the cached
trunk features of all images, any variant that only changes how those images are *scored*
can then be measured out of fold without training again:

* **region late interaction** (ColBERT-style MaxSim): each image is a set of region vectors;
  ``maxsim(q, c)`` is the mean over the query's regions of the best cosine among the
  candidate's regions (``symmetric``: the mean of both directions). A candidate's score is
  ``cosine + lam * maxsim``. Region vectors (:data:`REGIONS`):

  - ``trunk-3x3``: the 9 cells of the recipe's grid-pooled stages (untrained trunk channels,
    standardised over all images, each stage weighted alike, unit length);
  - ``trunk-7x7``: the 49 locations of stages 4-7 pooled to 7 x 7 (same treatment);
  - ``head-3x3``: the fold head's exact per-cell terms (the head is linear after pooling, so
    the unnormalised embedding is the sum of the 9 cells' terms plus the whole-map terms);
  - ``head-7x7``: the fold head's per-location terms (each location's features through the
    weights of the grid cells that contain it, divided by the cells' areas, plus its share
    of the whole-map taps): they average to the cell terms up to the 14 x 14 -> 7 x 7
    pooling of stages 4-5.

  ``lam`` (and, in the "chosen" row, the region kind and direction too) is chosen for each
  held-out fold on the other folds' sets (nested), so every figure is out of fold;

* **flip test-time augmentation**: each image's embedding averaged with its mirror's
  (``normalise(e + e_mirror)``), from trunk features of the mirrored images.

The per-image region maps and mirrored features are computed once (one pass over the
images per trunk) and cached in ``data/train/region-cache``. Every table reports the mean
and standard error over the folds and the paired difference against the unchanged fold
model on the same folds::

    python -m lookalike.evaluation.fold_rerank --config models/recipes/default.toml \\
        --cv-dir data/train/cv/e30/model.work/cv
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..core.files import atomic_write, images_identity
from ..core.machine import cpu_description
from ..core.scoring import hubness, set_cosines, set_metrics
from ..models.cohort import Cohort
from ..models.data import ImageDataset
from ..models.feature_cache import FeatureCache
from ..models.network import EmbeddingNet, stage_channels
from ..models.preprocess import Preprocessor
from ..models.regions_net import (
    LOCATIONS,
    REGION_STAGES,
    location_tokens,
    pool_locations,
    standardisation,
)
from ..models.rerank import maxsim, unit
from ..models.train import TrainConfig, load_data
from .crossval import CV_METRICS, fold_metrics, head_path, mean_se, pair_figures
from .verification import matrix_pairs

REGIONS = ("trunk-3x3", "trunk-7x7", "head-3x3", "head-7x7", "explain-7x7")
LAMBDAS = (0.0, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


# -- the one pass over the images: region maps and mirrored features ------------------------

def cached_features(config: TrainConfig, images: Sequence[Path]) -> np.ndarray:
    """The recipe's pooled trunk features of ``images`` ``(N, F)`` float64, from the training
    feature cache (computed into it when missing, with the trunks' ImageNet weights: a net
    left at random init would fill the cache with noise that every later run reads)."""
    net = EmbeddingNet(config.model_config(), pretrained=True)
    features = FeatureCache(net, config, torch.device("cpu")).get(images, 1, "all")[0]
    return features.float().numpy().astype(np.float64)


def region_cache(config: TrainConfig, images: Sequence[Path], directory: Path,
                 progress: bool = True, flip: bool = False,
                 stages: Sequence[int] = REGION_STAGES) -> dict[str, torch.Tensor]:
    """Per image (rows of ``images``), computed once and cached: ``b{i}.s{s}`` ``(N, C, 7, 7)``
    float16, stage ``s`` (of ``stages``) of backbone ``i`` average-pooled to 7 x 7,
    and ``mirror`` ``(N, F)`` float16, the recipe's pooled features of the mirrored image (the
    feature-cache layout). ``flip``: the stage maps of the *mirrored* images instead, and no
    ``mirror`` (a second cache, for training the region map on mirrored pairs too)."""
    model = config.model_config()
    facts = {"backbones": model.backbones, "taps": model.taps, "grid_taps": model.grid_taps,
             "grid": model.grid, "pooling": model.pooling, "size": model.input_size,
             "stages": list(stages), "locations": LOCATIONS,
             "images": images_identity(images)} | ({"flip": True} if flip else {})
    key = hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]
    path = directory / f"regions-{key}.safetensors"
    if path.is_file():
        return load_file(str(path))
    net = EmbeddingNet(model, pretrained=True).eval()
    preprocessor = Preprocessor(model.input_size, model.mean, model.std)
    loader = torch.utils.data.DataLoader(ImageDataset(images, preprocessor), batch_size=32)
    maps: dict[str, list[torch.Tensor]] = {}
    mirrored = []
    with torch.inference_mode():
        for batch in tqdm(loader, desc="mirrored regions" if flip else
                          "regions + mirrored features", disable=not progress):
            if flip:
                batch = torch.flip(batch, dims=[3])
            for b, trunk in enumerate(net.stages):
                x = batch
                for index, stage in enumerate(trunk):
                    x = stage(x)
                    if index in stages:
                        pooled = pool_locations(x, LOCATIONS).half().unflatten(
                            2, (LOCATIONS, LOCATIONS))
                        maps.setdefault(f"b{b}.s{index}", []).append(pooled)
                    if index >= max(stages):
                        break
            if not flip:
                mirrored.append(net.features(torch.flip(batch, dims=[3])).half())
    tensors = {name: torch.cat(parts).contiguous() for name, parts in maps.items()}
    if not flip:
        tensors["mirror"] = torch.cat(mirrored).contiguous()
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
    return tensors


# -- the feature layout, and the fold heads ---------------------------------------------------

@dataclass(frozen=True)
class Block:
    """One pooled block of the feature layout: ``kind`` 'tap' (whole-map mean), 'grid'
    (``C x cells``, channel-major) or 'last'."""

    backbone: int
    stage: int
    kind: str
    start: int
    width: int


def layout(config: TrainConfig) -> list[Block]:
    """The blocks of :meth:`EmbeddingNet.features` in order."""
    blocks, offset, cells = [], 0, config.grid * config.grid
    for b, name in enumerate(config.backbones):
        channels = stage_channels(name)
        for stage, width in enumerate(channels[:-1]):
            if stage in config.taps:
                blocks.append(Block(b, stage, "tap", offset, width))
                offset += width
            if stage in config.grid_taps:
                blocks.append(Block(b, stage, "grid", offset, width))
                offset += width * cells
        blocks.append(Block(b, len(channels) - 1, "last", offset, channels[-1]))
        offset += channels[-1]
    return blocks


@dataclass(frozen=True)
class Head:
    """A fold model's trained part: ``z = (f - mean) / std``, ``e = W z + bias``."""

    mean: np.ndarray
    std: np.ndarray
    weight: np.ndarray
    bias: np.ndarray

    @classmethod
    def load(cls, path: Path) -> Head:
        state = {k: v.float().numpy().astype(np.float64) for k, v in load_file(str(path)).items()}
        linear = sorted(k for k in state if k.startswith("head.") and k.endswith(".weight"))
        if len(linear) != 1:
            raise ValueError(f"{path}: a single linear head is needed, got {linear}")
        prefix = linear[0][: -len("weight")]
        return cls(state["standardize.mean"], state["standardize.std"], state[linear[0]],
                   state[prefix + "bias"])

    def embed(self, features: np.ndarray) -> np.ndarray:
        """``(N, F)`` -> ``(N, D)`` unit vectors (as :meth:`EmbeddingNet.project`)."""
        e = ((features - self.mean) / self.std) @ self.weight.T + self.bias
        return e / np.linalg.norm(e, axis=1, keepdims=True)


def trunk_3x3(features: np.ndarray, config: TrainConfig) -> np.ndarray:
    """``(N, F)`` -> ``(N, cells, C)``: grid cells of the untrained stages (standardised over
    all images and cells per channel, each stage weighted alike, unit length)."""
    cells = config.grid * config.grid
    parts = []
    for block in layout(config):
        if block.kind != "grid":
            continue
        x = features[:, block.start:block.start + block.width * cells]
        x = x.reshape(len(features), block.width, cells)
        x = (x - x.mean(axis=(0, 2), keepdims=True)) / (x.std(axis=(0, 2), keepdims=True) + 1e-6)
        parts.append(x.transpose(0, 2, 1) / np.sqrt(block.width))
    return unit(np.concatenate(parts, axis=2))


def stage_maps(maps: dict[str, np.ndarray], backbones: int,
               stages: Sequence[int] = REGION_STAGES) -> list[np.ndarray]:
    """The cache's region maps as ``(N, C, 49)`` per stage, in the order of the learned
    regions' tokens (:mod:`~lookalike.models.regions_net`): trunk, then stage."""
    return [maps[f"b{b}.s{stage}"].reshape(len(maps[f"b{b}.s{stage}"]), -1, LOCATIONS**2)
            for b in range(backbones) for stage in stages]


def trunk_7x7(maps: dict[str, np.ndarray], backbones: int) -> np.ndarray:
    """Region maps -> ``(N, 49, C)`` per-location vectors, standardised as the learned
    regions' tokens are, at unit length."""
    per_stage = stage_maps(maps, backbones)
    return unit(location_tokens(per_stage, *standardisation(per_stage)))


def head_3x3(features: np.ndarray, head: Head, config: TrainConfig) -> np.ndarray:
    """``(N, F)`` -> ``(N, cells, D)``: each grid cell's exact term of the fold head's
    unnormalised embedding (all grid stages and backbones of that cell)."""
    cells = config.grid * config.grid
    z = (features - head.mean) / head.std
    out = np.zeros((len(features), cells, head.weight.shape[0]))
    for block in layout(config):
        if block.kind != "grid":
            continue
        span = slice(block.start, block.start + block.width * cells)
        zs = z[:, span].reshape(len(z), block.width, cells)
        ws = head.weight[:, span].reshape(-1, block.width, cells)
        out += np.einsum("ncr,dcr->nrd", zs, ws)
    return out


def _cell_masks(grid: int, size: int) -> np.ndarray:
    """``(cells, size * size)``: which of a ``size`` x ``size`` map's locations each cell of
    :func:`~lookalike.models.network.grid_pool` covers."""
    masks = np.zeros((grid * grid, size, size))
    for i in range(grid):
        top, bottom = (i * size) // grid, -(-((i + 1) * size) // grid)
        for j in range(grid):
            left, right = (j * size) // grid, -(-((j + 1) * size) // grid)
            masks[i * grid + j, top:bottom, left:right] = 1.0
    return masks.reshape(grid * grid, -1)


def head_7x7(maps: dict[str, np.ndarray], head: Head, config: TrainConfig) -> np.ndarray:
    """Region maps -> ``(N, 49, D)``: each location's term of the fold head's embedding."""
    masks = _cell_masks(config.grid, LOCATIONS).astype(bool)
    cells = config.grid * config.grid
    out = None
    for block in layout(config):
        if block.kind == "last":
            continue
        x = maps[f"b{block.backbone}.s{block.stage}"].astype(np.float32)
        n, channels = x.shape[:2]
        x = x.reshape(n, channels, -1).transpose(0, 2, 1)  # (N, L, C)
        locations = x.shape[1]
        if out is None:
            out = np.zeros((n, locations, head.weight.shape[0]), np.float32)
        if block.kind == "tap":  # the whole-map mean: each location's 1/L share
            span = slice(block.start, block.start + block.width)
            w = (head.weight[:, span] / head.std[span]).astype(np.float32)  # (D, C)
            out += (x @ w.T - (w @ head.mean[span]).astype(np.float32)) / locations
            continue
        span = slice(block.start, block.start + block.width * cells)
        w = (head.weight[:, span] / head.std[span]).reshape(-1, block.width, cells)
        mu = head.mean[span].reshape(block.width, cells)
        for r in range(cells):  # a cell's mean: each of its locations' 1/|cell| share
            inside = masks[r]
            wr = w[:, :, r].astype(np.float32)
            term = x[:, inside] @ wr.T - (wr @ mu[:, r]).astype(np.float32)
            out[:, inside] += term / inside.sum()
    return out


def explain_7x7(config: TrainConfig, head_file: Path, images: Sequence[Path], directory: Path,
                progress: bool = False) -> np.ndarray:
    """``(N, 49, D)``: the fold model's exact per-location terms (:class:`~lookalike.models.
    explain_net.LocationTerms`, what ``/explain`` splits a cosine with) of ``images``, the
    regions a production re-ranker would have; computed once per fold head and cached."""
    from ..models.explain_net import LocationTerms, derive_readout

    digest = hashlib.sha256(head_file.read_bytes() + json.dumps(
        [str(p) for p in images]).encode()).hexdigest()[:16]
    path = directory / f"terms-{digest}.npy"
    if path.is_file():
        return np.load(path)
    net = EmbeddingNet(config.model_config(), pretrained=True).eval()
    net.load_state_dict(load_file(str(head_file)), strict=False)
    model = net.config
    preprocessor = Preprocessor(model.input_size, model.mean, model.std)
    loader = torch.utils.data.DataLoader(ImageDataset(images, preprocessor), batch_size=32)
    first = next(iter(loader))
    module = LocationTerms(net, derive_readout(net, first[:2]))
    with torch.inference_mode():
        terms = np.concatenate([module(batch).numpy() for batch in tqdm(
            loader, desc=f"terms {head_file.name}", disable=not progress)])
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: np.save(open(tmp, "wb"), terms))
    return terms


# -- scoring ------------------------------------------------------------------------------------

@dataclass
class Fold:
    number: int
    rows: np.ndarray
    """Row of each validation image in the data's image list."""
    vectors: np.ndarray
    queries: np.ndarray
    candidates: np.ndarray
    answers: np.ndarray
    head: Head | None

    @property
    def truth(self) -> np.ndarray:
        """Each set's matching candidate (a row of the validation images): the columns of
        :func:`pair_matrix`."""
        return self.candidates[np.arange(len(self.answers)), self.answers]

    def minus_hubness(self, pairs: np.ndarray, hub: np.ndarray) -> np.ndarray:
        """:func:`pair_matrix` scores minus half of each side's hubness ``hub`` (one per
        validation image), as the served pair scores subtract them."""
        return pairs - 0.5 * (hub[self.queries][:, None] + hub[self.truth][None, :])

    def cosines(self, vectors: np.ndarray | None = None) -> np.ndarray:
        return set_cosines(self.vectors if vectors is None else vectors, self.queries,
                           self.candidates)

    def late(self, regions: np.ndarray, symmetric: bool,
             candidate_regions: np.ndarray | None = None,
             weights: np.ndarray | None = None) -> np.ndarray:
        """``(S, C)`` MaxSim of each set's candidates; ``regions`` rows = validation images
        (``candidate_regions``, if given, the candidates' side: more regions per image;
        ``weights``, if given, each image's query-region weights)."""
        targets = regions if candidate_regions is None else candidate_regions
        return np.stack([maxsim(regions[q], targets[c], symmetric,
                                None if weights is None else weights[q])
                         for q, c in zip(self.queries, self.candidates, strict=True)])


def load_folds(cv_dir: Path, images: Sequence[Path]) -> list[Fold]:
    rows = {str(path): row for row, path in enumerate(images)}
    folds = []
    for number in sorted(int(p.stem.split("-")[1]) for p in cv_dir.glob("fold-*.json")):
        record = json.loads((cv_dir / f"fold-{number}.json").read_text())
        with np.load(cv_dir / f"fold-{number}.npz") as arrays:
            data = {k: arrays[k] for k in ("vectors", "queries", "candidates", "answers")}
        head = head_path(cv_dir, number)
        folds.append(Fold(number, np.array([rows[p] for p in record["images"]]), **data,
                          head=Head.load(head) if head.is_file() else None))
    return folds


def cell(values: Sequence[float]) -> str:
    mean, se = mean_se(values)
    return f"{mean:.3f} ± {se:.3f}"


def signed(values: Sequence[float]) -> str:
    mean, se = mean_se(values)
    return f"{mean:+.3f} ± {se:.3f}"


def out_of_fold_picks(table: np.ndarray) -> list[int]:
    """``(folds, options)`` scores -> per fold, the option best by mean over the *other*
    folds (ties: the first), so no fold's own figure chooses what it is scored with."""
    return [int(np.argmax(np.delete(table, k, axis=0).mean(axis=0))) for k in range(len(table))]


Table = list[list[dict[str, float]]]
"""Per fold, per weight ``lam``: the fold's figures for ``cosine + lam * late``."""


def set_table(cosines: list[np.ndarray], lates: list[np.ndarray], answers: list[np.ndarray],
              lambdas: Sequence[float] = LAMBDAS) -> Table:
    """Each fold's candidate-set figures (top-1, top-5, MRR) at each ``lam``."""
    return [[set_metrics(c + lam * li, a) for lam in lambdas]
            for c, li, a in zip(cosines, lates, answers, strict=True)]


def pick_nested(table: Table, lambdas: Sequence[float], metric: str
                ) -> tuple[list[float], list[dict[str, float]]]:
    """For each fold, the ``lam`` best by mean ``metric`` on the other folds (ties: the
    smaller), and the fold's figures at that ``lam``."""
    picks = out_of_fold_picks(np.array([[t[metric] for t in row] for row in table]))
    return [lambdas[p] for p in picks], [table[k][p] for k, p in enumerate(picks)]


def nested(cosines: list[np.ndarray], lates: list[np.ndarray], answers: list[np.ndarray],
           lambdas: Sequence[float] = LAMBDAS) -> tuple[list[float], list[dict[str, float]]]:
    """For each fold, ``lam`` best by mean top-1 on the other folds (ties: the smaller), and
    the fold's metrics at that ``lam``."""
    return pick_nested(set_table(cosines, lates, answers, lambdas), lambdas, "top1")


def pair_matrix(fold: Fold, vectors: np.ndarray, regions: np.ndarray | None = None,
                candidate_regions: np.ndarray | None = None,
                weights: np.ndarray | None = None, symmetric: bool = False) -> np.ndarray:
    """``(N, N)`` scores of each query (left image) against every pair's true match: the
    cosine of ``vectors``, or with ``regions`` the MaxSim (query -> candidate, the candidates'
    side from ``candidate_regions`` if given, the query's regions weighted by ``weights`` if
    given; ``symmetric``: both ways, each side's regions weighted by its own); the diagonal
    holds the matching pairs (the layout :func:`~.verification.matrix_pairs` splits)."""
    truth = fold.truth
    if regions is None:
        return vectors[fold.queries] @ vectors[truth].T
    targets = (regions if candidate_regions is None else candidate_regions)[truth]
    back = None if weights is None else weights[truth]
    return np.stack([maxsim(regions[q], targets, symmetric,
                            None if weights is None else weights[q], back)
                     for q in fold.queries])


def figures(matrix: np.ndarray) -> dict[str, float]:
    """A fold's verification figures from its :func:`pair_matrix` scores."""
    return pair_figures(*matrix_pairs(matrix))


def pair_table(cosines: list[np.ndarray], lates: list[np.ndarray],
               lambdas: Sequence[float] = LAMBDAS) -> Table:
    """Each fold's verification figures (its ``(N, N)`` pair matrices) at each ``lam``."""
    return [[figures(c + lam * li) for lam in lambdas]
            for c, li in zip(cosines, lates, strict=True)]


def nested_verification(cosines: list[np.ndarray], lates: list[np.ndarray],
                        lambdas: Sequence[float] = LAMBDAS
                        ) -> tuple[list[float], list[dict[str, float]]]:
    """For each fold (its ``(N, N)`` pair matrices), ``lam`` best by mean AUC on the other
    folds, and the fold's verification figures for ``cosine + lam * late`` at that ``lam``."""
    return pick_nested(pair_table(cosines, lates, lambdas), lambdas, "auc")


def fold_cohort(fold: Fold, features: np.ndarray) -> np.ndarray:
    """The fold model's unit embeddings of the images it trained on (every image outside the
    fold): the cohort its pair scores are corrected against, as a shipped model's is its
    training images (:func:`bundle_cohort`); stored as a bundle stores it."""
    return Cohort.as_stored(fold.head.embed(np.delete(features, fold.rows, axis=0)))


def corrected_pairs(fold: Fold, cosines: np.ndarray, cohort: np.ndarray, k: int) -> np.ndarray:
    """A fold's :func:`pair_matrix` cosines minus half of each side's hubness against
    ``cohort`` (its ``k`` nearest; ``k`` 0: unchanged), as the served pair scores do."""
    if not k:
        return cosines
    return fold.minus_hubness(cosines, hubness(fold.vectors, cohort, k))


def bundle_cohort(model_dir: Path, features: np.ndarray, config: TrainConfig,
                  recipe: Path) -> Cohort:
    """A bundle's cohort: its own embeddings (its trained head on the cached trunk ``features``
    of the training images of ``config``, as each fold's cohort is made)."""
    from ..models.bundle import WEIGHTS_FILE

    vectors = Head.load(Path(model_dir) / WEIGHTS_FILE).embed(features)
    return Cohort(vectors.astype(np.float32), {
        "images": len(features), "pairs_file": str(config.pairs), "recipe": str(recipe)})


def tta_vectors(fold: Fold, features: np.ndarray, mirror: np.ndarray) -> np.ndarray:
    """The fold model's flip-TTA unit vectors of its validation images: ``normalise(e +
    e_mirror)`` from the cached features of the images and of their mirrors."""
    return unit(fold.head.embed(features[fold.rows]) + fold.head.embed(mirror[fold.rows]))


def verification_table(folds: list[Fold], tta_vectors: list[np.ndarray],
                       regions_of: dict[str, list[np.ndarray]]) -> dict[str, object]:
    """Verification (AUC, EER, TMR at 1% FMR) when a pair's score is the re-ranker's
    ``cosine + lam * maxsim``, ``lam`` chosen per fold by mean AUC on the other folds; printed
    as a table against the fold model's plain cosine, paired on the same folds."""
    plain = [pair_matrix(f, f.vectors) for f in folds]
    tta = [pair_matrix(f, v) for f, v in zip(folds, tta_vectors, strict=True)]
    rows: dict[str, tuple[object, list[dict[str, float]]]] = {
        "fold model": ("", [figures(m) for m in plain]),
        "flip TTA": ("", [figures(m) for m in tta])}
    for kind, per_fold in regions_of.items():
        late = [pair_matrix(f, None, r) for f, r in zip(folds, per_fold, strict=True)]
        for name, cos in (("plain", plain), ("flip TTA", tta)):
            rows[f"{name} cosine + lam x {kind}"] = nested_verification(cos, late)
    metrics = ("auc", "eer", "tmr_at_far")
    base = rows["fold model"][1]
    print("\n| verification score | lam per fold | " + " | ".join(metrics)
          + " | paired AUC | paired TMR |\n|---|---|" + "---|" * (len(metrics) + 2))
    for name, (chosen, found) in rows.items():
        paired = [signed([m[k] - b[k] for m, b in zip(found, base, strict=True)])
                  for k in ("auc", "tmr_at_far")]
        print(f"| {name} | {chosen} | " + " | ".join(cell([m[k] for m in found]) for k in metrics)
              + f" | {paired[0]} | {paired[1]} |", flush=True)
    return {name: {"lam": chosen, "metrics": found} for name, (chosen, found) in rows.items()}


# -- what flip TTA costs -----------------------------------------------------------------------

def tta_speed(model_path: Path, images: Sequence[Path], engine: str = "onnx-int8",
              batch_size: int = 32, repeats: int = 3) -> dict[str, float]:
    """End-to-end images/s (read, decode, preprocess, forward) of the model on ``engine``,
    plain and with flip TTA (the batch and its mirror in one forward call, embeddings
    averaged), interleaved pass by pass; the best of ``repeats`` each."""
    from ..models.embedder import Embedder
    from ..models.engines import EngineOptions, create_engine
    from ..models.resolve import default_cache_dir, resolve_model

    model = resolve_model(str(model_path), default_cache_dir())
    run = create_engine(engine, model, EngineOptions(2, default_cache_dir()))

    def flipped(batch: np.ndarray) -> np.ndarray:
        both = run(np.concatenate([batch, np.ascontiguousarray(batch[..., ::-1])]))
        return unit(both[: len(batch)] + both[len(batch):]).astype(np.float32)

    embedders = {"plain": Embedder(model, engine, run=run),
                 "flip TTA": Embedder(model, engine, run=flipped)}
    best = dict.fromkeys(embedders, 0.0)
    for _ in range(repeats):
        for name, embedder in embedders.items():
            started = time.perf_counter()
            done = sum(len(b.indices) for b in embedder.embed_files(images, batch_size))
            best[name] = max(best[name], done / (time.perf_counter() - started))
    return best


# -- the report ---------------------------------------------------------------------------------

def add_row_arguments(parser: argparse.ArgumentParser) -> None:
    """``--config``, ``--cv-dir`` and ``--set``: the CV row a fold tool reads (see
    :func:`row_recipe`)."""
    parser.add_argument("--config", type=Path, required=True, help="the CV row's recipe")
    parser.add_argument("--cv-dir", type=Path, required=True,
                        help="WORK_DIR/cv of 'lookalike train --cv K --keep-fold-models'")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="recipe override, as the CV row was run (e.g. backbones=a,b)")


def row_recipe(args: argparse.Namespace, **overrides: str) -> TrainConfig:
    """The CV row's recipe: ``--config`` with its ``--set`` overrides (then ``overrides``)."""
    given = dict(item.split("=", 1) for item in args.set)
    return TrainConfig.from_file(args.config, progress=False, **{**given, **overrides})


def comma_separated(cast: Callable[[str], float]) -> Callable[[str], tuple]:
    """An argparse ``type`` for a comma-separated list: ``"0,5,10"`` -> ``(0, 5, 10)``, each
    value read by ``cast`` (``int`` or ``float``)."""
    return lambda text: tuple(cast(v) for v in text.split(","))


def machine() -> str:
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"{cpu_description()}; load average {load}"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_row_arguments(parser)
    parser.add_argument("--region-cache", type=Path, default=Path("data/train/region-cache"))
    parser.add_argument("--regions", default=",".join(REGIONS[:4]),
                        help=f"region kinds among {', '.join(REGIONS)} (explain-7x7 runs the "
                             "fold models' exact location terms: a forward pass per fold)")
    parser.add_argument("--cache-backbones", default="efficientnet_lite0,efficientnet_lite1",
                        help="trunks of the one region/mirror pass (a prefix of them may be "
                             "the row's: Lite0's features are the first part of the fusion's)")
    parser.add_argument("--verification", action="store_true",
                        help="also score each fold's verification pairs (every query against "
                             "every pair's match) with each region kind's late interaction")
    parser.add_argument("--json", type=Path, help="write the per-fold figures here")
    parser.add_argument("--speed-model", type=Path,
                        help="only measure flip TTA's cost (images/s) for this bundle")
    parser.add_argument("--speed-images", type=int, default=512)
    args = parser.parse_args(argv)
    if args.speed_model is not None:
        images = load_data(row_recipe(args)).images[: args.speed_images]
        print(f"machine: {machine()}", flush=True)
        for batch_size in (32, 8):
            found = tta_speed(args.speed_model, images, batch_size=batch_size)
            print(f"{args.speed_model} onnx-int8 batch {batch_size}: " + ", ".join(
                f"{k} {v:.1f} images/s" for k, v in found.items())
                + f" (ratio {found['flip TTA'] / found['plain']:.2f}x); {machine()}", flush=True)
        return
    config = row_recipe(args)
    print(f"machine: {machine()}", flush=True)
    started = time.perf_counter()
    data = load_data(config)
    features = cached_features(config, data.images)
    cache_config = row_recipe(args, backbones=args.cache_backbones)
    if cache_config.backbones[:len(config.backbones)] != config.backbones:
        raise SystemExit("--cache-backbones must start with the row's backbones")
    cache = region_cache(cache_config, data.images, args.region_cache)
    mirror = cache["mirror"].float().numpy().astype(np.float64)[:, :features.shape[1]]
    maps = {k: v.float().numpy() for k, v in cache.items() if k != "mirror"}
    print(f"features ready in {time.perf_counter() - started:.0f} s", flush=True)
    folds = load_folds(args.cv_dir, data.images)
    if any(f.head is None for f in folds):
        raise SystemExit(f"{args.cv_dir}: fold heads missing; re-run the row with "
                         "--keep-fold-models")
    report: dict[str, object] = {"machine": machine(), "cv_dir": str(args.cv_dir), "folds": {}}

    # The fold heads reproduce the saved out-of-fold vectors (the same model, re-applied).
    worst = max(float(np.abs(f.head.embed(features[f.rows]) - f.vectors).max()) for f in folds)
    print(f"fold heads vs saved vectors: largest difference {worst:.2e}")

    # 1. Flip TTA: all six CV figures, paired against the unchanged fold model.
    flipped = [tta_vectors(f, features, mirror) for f in folds]
    base, tta = [], []
    for f, both in zip(folds, flipped, strict=True):
        for vectors, out in ((f.head.embed(features[f.rows]), base), (both, tta)):
            scores = set_metrics(f.cosines(vectors), f.answers)
            out.append(fold_metrics(vectors, f.queries, f.candidates, f.answers, scores)[0])
    print("\n| scoring | " + " | ".join(CV_METRICS) + " |\n|---|" + "---|" * len(CV_METRICS))
    for name, rows in (("fold model", base), ("fold model + flip TTA", tta)):
        print(f"| {name} | " + " | ".join(cell([r[k] for r in rows]) for k in CV_METRICS) + " |")
    print("| paired (TTA - model) | " + " | ".join(
        signed([t[k] - b[k] for t, b in zip(tta, base, strict=True)]) for k in CV_METRICS) + " |")
    report["folds"]["base"], report["folds"]["tta"] = base, tta

    # 2. Region late interaction, lam nested; with and without TTA's global cosine.
    cosines = [f.cosines() for f in folds]
    tta_cos = [f.cosines(v) for f, v in zip(folds, flipped, strict=True)]
    answers = [f.answers for f in folds]
    lates: dict[tuple[str, bool], list[np.ndarray]] = {}
    regions_of: dict[str, list[np.ndarray]] = {}
    for kind in args.regions.split(","):
        t0 = time.perf_counter()
        per_fold = []
        every = (trunk_3x3(features, config) if kind == "trunk-3x3" else
                 trunk_7x7(maps, len(config.backbones)) if kind == "trunk-7x7" else None)
        for f in folds:
            if every is not None:
                regions = every[f.rows]
            elif kind == "head-3x3":
                regions = unit(head_3x3(features[f.rows], f.head, config))
            elif kind == "explain-7x7":
                regions = unit(explain_7x7(config, head_path(args.cv_dir, f.number),
                                            [data.images[r] for r in f.rows], args.region_cache))
            elif kind == "head-7x7":
                regions = unit(head_7x7({k: v[f.rows] for k, v in maps.items()}, f.head, config))
            else:
                raise SystemExit(f"unknown region kind {kind!r}; choose from {REGIONS}")
            per_fold.append(regions)
        regions_of[kind] = per_fold
        for symmetric in (False, True):
            lates[kind, symmetric] = [f.late(r, symmetric) for f, r in
                                      zip(folds, per_fold, strict=True)]
        print(f"{kind}: regions {per_fold[0].shape[1:]}, {time.perf_counter() - t0:.0f} s",
              flush=True)
    base_rank = [set_metrics(c, a) for c, a in zip(cosines, answers, strict=True)]
    print("\n| re-ranker | direction | on cosine | lam chosen per fold | alone top-1 | top-1 "
          "| top-5 | MRR | paired top-1 | paired MRR |\n|---|---|---|---|---|---|---|---|---|---|")
    print(f"| none (fold model) | | plain | | | {cell([m['top1'] for m in base_rank])} | "
          f"{cell([m['top5'] for m in base_rank])} | {cell([m['mrr'] for m in base_rank])} | | |")
    for (kind, symmetric), late in lates.items():
        alone = [set_metrics(li, a)["top1"] for li, a in zip(late, answers, strict=True)]
        direction = "symmetric" if symmetric else "query -> candidate"
        for name, cos in (("plain", cosines), ("flip TTA", tta_cos)):
            chosen, found = nested(cos, late, answers)
            gain = [m["top1"] - b["top1"] for m, b in zip(found, base_rank, strict=True)]
            print(f"| {kind} | {direction} | {name} | {chosen} | {cell(alone)} | "
                  f"{cell([m['top1'] for m in found])} | {cell([m['top5'] for m in found])} | "
                  f"{cell([m['mrr'] for m in found])} | {signed(gain)} "
                  f"{[round(g, 3) for g in gain]} | "
                  f"{signed([m['mrr'] - b['mrr'] for m, b in zip(found, base_rank, strict=True)])}"
                  " |")
            report["folds"][f"{kind}/{direction}/{name}"] = {"lam": chosen, "metrics": found}

    # 3. Every knob nested at once (region kind, direction, lam), on the plain and TTA cosine.
    for name, cos in (("plain cosine", cosines), ("flip-TTA cosine", tta_cos)):
        options = [(key, lam) for key in lates for lam in LAMBDAS]
        table = np.array([[set_metrics(cos[k] + lam * lates[key][k], answers[k])["top1"]
                           for key, lam in options] for k in range(len(folds))])
        picks, found = [], []
        for k, pick in enumerate(out_of_fold_picks(table)):
            key, lam = options[pick]
            picks.append(f"{key[0]}{' sym' if key[1] else ''} lam {lam}")
            found.append(set_metrics(cos[k] + lam * lates[key][k], answers[k]))
        print(f"\nall knobs nested, {name}: picks {picks}\n"
              f"  top-1 {cell([m['top1'] for m in found])}"
              f", top-5 {cell([m['top5'] for m in found])}, MRR {cell([m['mrr'] for m in found])};"
              f" paired top-1 vs fold model "
              f"{signed([m['top1'] - b['top1'] for m, b in zip(found, base_rank, strict=True)])}")
        report["folds"][f"nested-all/{name}"] = {"picks": picks, "metrics": found}
    if args.verification:
        report["folds"]["verification"] = verification_table(folds, flipped, regions_of)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    print(f"\ndone in {time.perf_counter() - started:.0f} s; {machine()}")
    subprocess.run(["uptime"], check=False)


if __name__ == "__main__":
    main()
