"""Region vectors trained for late interaction: the re-ranker's network (issue 14).

Look-alike pairs are often alike in one part (a hairstyle, a pose, a shape in one corner), so
a candidate is also scored region to region, as ColBERT scores tokens: MaxSim is the mean
over the query's regions of the best cosine among the candidate's regions
(:func:`~.rerank.maxsim`). The regions are *learned*: each image's ``7 x 7`` locations are
stages 4-7 of every trunk average-pooled to ``7 x 7`` and standardised per channel (each
stage weighted alike), and one linear map ``W`` takes them to ``dim`` values of unit length.
``W`` is trained on look-alike pairs with a symmetric InfoNCE over in-batch MaxSim scores
(:func:`train_region_map`), and with it an *importance* vector whose softmax over an image's
locations weighs its regions as a query's (:func:`region_weights`): a plain mean gives a
blank background the weight of a face. In 5-fold cross-validation 256-d regions gained +0.029
to +0.042 top-1 on the ``accurate`` model with the plain mean (five seeds), and +0.075 with
the learned weights (0.629 top-1; +0.036 ± 0.007 over the plain mean in every fold; 0.638
with the InfoNCE's temperature at 0.03 instead of 0.05), against
+0.015 for MaxSim over the untrained ``/explain`` terms (``benchmarks/RESULTS.md``, issue 14).

A :class:`RegionMap` is a measured property of one model's weights, like its calibration, so
it is stored beside the bundle (:data:`~.model.REGIONS_FILE`), outside the fingerprinted
files, with the fingerprint it was trained for: adding one never orphans an index.
:class:`DescribeNet` gives an image's embedding and its regions from one pass of the trunks;
it exports to ONNX as it is (``rerank.onnx``), so the torch-free service re-ranks too.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.scoring import unit
from .errors import BundleError
from .model import REGIONS_FILE
from .network import EmbeddingNet, grid_pool

__all__ = ["LOCATIONS", "MAP_DIM", "MAP_EPOCHS", "MAP_TEMPERATURE", "REGION_STAGES",
           "DescribeNet", "RegionMap", "TrainedMap", "batch_maxsim", "pool_locations",
           "region_weights", "standardisation", "train_region_map"]

REGION_STAGES = (4, 5, 6, 7)
"""The stages (of every trunk) whose output maps make an image's region vectors."""
MAP_DIM, MAP_EPOCHS, MAP_TEMPERATURE = 256, 5, 0.03
"""The shipped map's width, epochs and InfoNCE temperature (it also learns the query-region
weights: :func:`train_region_map`'s ``weighted``), chosen on 5-fold cross-validation
(``benchmarks/RESULTS.md``, issue 14: 256-d of 128 / 256 / 512; 5 epochs of 5 / 10;
temperature 0.03 of 0.02 / 0.03 / 0.05 / 0.1)."""
LOCATIONS = 7
"""Regions per side: stages 4-5 (14 x 14 at 224 px) are pooled to it, stages 6-7 are it."""


def pool_locations(x: torch.Tensor, locations: int = LOCATIONS) -> torch.Tensor:
    """``(B, C, H, W)`` -> ``(B, C, locations**2)``, row-major cell means (exports to ONNX)."""
    # unflatten, not view(len(x), ...): the ONNX export must keep the batch axis dynamic.
    return grid_pool(x, locations).unflatten(1, (x.shape[1], locations * locations))


def standardisation(maps: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Per stage map ``(N, C_s, L)`` of N images -> ``mean`` and ``scale`` ``(sum C_s,)``:
    ``(x - mean) * scale`` gives each channel zero mean and unit deviation over the images
    and locations, divided by ``sqrt(C_s)`` so that each stage weighs alike."""
    means, scales = [], []
    for x in maps:
        x = np.asarray(x, np.float64)
        means.append(x.mean(axis=(0, 2)))
        scales.append(1.0 / ((x.std(axis=(0, 2)) + 1e-6) * np.sqrt(x.shape[1])))
    return np.concatenate(means).astype(np.float32), np.concatenate(scales).astype(np.float32)


def location_tokens(maps: Sequence[np.ndarray], mean: np.ndarray, scale: np.ndarray
                    ) -> np.ndarray:
    """Per stage map ``(N, C_s, L)`` -> ``(N, L, sum C_s)`` standardised location vectors."""
    tokens = np.concatenate([np.asarray(x, np.float32) for x in maps], axis=1)
    return ((tokens - mean[None, :, None]) * scale[None, :, None]).transpose(0, 2, 1)


def batch_maxsim(queries: torch.Tensor, candidates: torch.Tensor,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """``(B, R, D)`` and ``(C, S, D)`` unit regions -> ``(B, C)``: each query's mean over its
    regions of the best cosine among each candidate's regions, or, with ``weights`` ``(B, R)``
    (each row summing to 1), the query regions' weighted sum (differentiable)."""
    best = torch.einsum("ird,jsd->ijrs", queries, candidates).amax(dim=3)  # (B, C, R)
    return best.mean(dim=2) if weights is None else (best * weights[:, None, :]).sum(dim=2)


def region_weights(tokens: torch.Tensor, importance: torch.Tensor) -> torch.Tensor:
    """``(N, L, C)`` standardised tokens, ``(C,)`` importance -> ``(N, L)``: a softmax over
    each image's locations of their importance scores."""
    return (tokens @ importance).softmax(dim=-1)


@dataclass(frozen=True)
class TrainedMap:
    """What :func:`train_region_map` learns: the map ``weight`` ``(dim, C)`` and, when the
    query's regions are weighted, the ``importance`` ``(C,)`` that weighs them."""

    weight: torch.Tensor
    importance: torch.Tensor | None = None


def train_region_map(tokens: torch.Tensor, pairs: np.ndarray, dim: int = MAP_DIM,
                     epochs: int = MAP_EPOCHS, temperature: float = MAP_TEMPERATURE,
                     weight_decay: float = 0.01, lr: float = 1e-3,
                     batch_size: int = 128, seed: int = 0, weighted: bool = True,
                     importance_lr: float = 1e-2) -> TrainedMap:
    """``W`` ``(dim, C)`` trained so that each pair ``(first, second)`` of ``pairs`` (rows of
    ``tokens`` ``(N, L, C)``) has a higher MaxSim than the batch's other pairs: a symmetric
    InfoNCE at ``temperature``, AdamW, one-cycle schedule (10% warm-up, cosine decay).

    ``weighted`` also learns which of the query's regions count (:func:`region_weights`):
    look-alikes are often alike in one part, and a plain mean gives a blank background the
    weight of a face. The importance starts at zero, the plain mean, at its own learning rate
    ``importance_lr``."""
    torch.manual_seed(seed)
    projection = nn.Linear(tokens.shape[2], dim, bias=False)
    groups: list[dict[str, Any]] = [{"params": list(projection.parameters()), "lr": lr}]
    importance = None
    if weighted:
        importance = nn.Parameter(torch.zeros(tokens.shape[2]))
        groups.append({"params": [importance], "lr": importance_lr})
    optimiser = torch.optim.AdamW(groups, weight_decay=weight_decay)
    # A short run (a smoke test) keeps >= 2 warm-up steps, which the scheduler needs.
    steps = max(3, epochs * -(-len(pairs) // batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, [g["lr"] for g in groups],
                                                   total_steps=steps,
                                                   pct_start=max(0.1, 2 / steps))
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(pairs))
        for start in range(0, len(order), batch_size):
            batch = torch.from_numpy(pairs[order[start:start + batch_size]])
            a, b = tokens[batch[:, 0]], tokens[batch[:, 1]]
            first = F.normalize(projection(a), dim=-1)
            second = F.normalize(projection(b), dim=-1)
            if importance is None:  # the plain map: the same scores read both ways
                forward = batch_maxsim(first, second)
                backward = forward.T
            else:  # each side is the query once, weighted by its own regions' importance
                forward = batch_maxsim(first, second, region_weights(a, importance))
                backward = batch_maxsim(second, first, region_weights(b, importance))
            target = torch.arange(len(batch))
            loss = 0.5 * (F.cross_entropy(forward / temperature, target)
                          + F.cross_entropy(backward / temperature, target))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    return TrainedMap(projection.weight.detach().clone(),
                      None if importance is None else importance.detach().clone())


@dataclass(frozen=True)
class RegionMap:
    """A trained region map: ``regions = normalise(weight @ ((x - mean) * scale))`` per
    location ``x`` of the ``stages`` (``(trunk, stage, channels)``) pooled to ``locations``
    per side; with an ``importance``, each query region's weight in MaxSim is a softmax over
    the image's locations of ``importance @ ((x - mean) * scale)`` (without: the plain mean);
    ``facts`` say how it was trained."""

    weight: np.ndarray
    mean: np.ndarray
    scale: np.ndarray
    stages: tuple[tuple[int, int, int], ...]
    locations: int = LOCATIONS
    facts: dict[str, Any] = field(default_factory=dict)
    importance: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return int(self.weight.shape[0])

    def regions(self, tokens: np.ndarray) -> np.ndarray:
        """``(N, L, C)`` standardised tokens -> ``(N, L, dim)`` unit region vectors."""
        return unit(tokens @ self.weight.T)

    @property
    def weighted(self) -> bool:
        """Whether the query's regions are weighted (else MaxSim is their plain mean)."""
        return self.importance is not None

    def weights(self, tokens: np.ndarray) -> np.ndarray | None:
        """``(N, L, C)`` standardised tokens -> ``(N, L)`` query-region weights (rows sum to
        1), or None for the plain mean."""
        if self.importance is None:
            return None
        return region_weights(torch.from_numpy(np.asarray(tokens, np.float32)),
                              torch.from_numpy(self.importance.astype(np.float32))).numpy()

    def save(self, directory: Path, fingerprint: str) -> Path:
        """Write :data:`~.model.REGIONS_FILE` into the bundle ``directory`` (atomically),
        naming the model ``fingerprint`` it was trained for."""
        from safetensors.numpy import save_file

        from ..core.files import atomic_write

        metadata = {"model_fingerprint": fingerprint, "locations": str(self.locations),
                    "stages": json.dumps(self.stages), "facts": json.dumps(self.facts)}
        tensors = {"weight": self.weight.astype(np.float32), "mean": self.mean.astype(np.float32),
                   "scale": self.scale.astype(np.float32)}
        if self.importance is not None:
            tensors["importance"] = self.importance.astype(np.float32)
        return atomic_write(Path(directory) / REGIONS_FILE,
                            lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    @classmethod
    def load(cls, directory: Path, fingerprint: str) -> RegionMap:
        """The bundle's region map; :class:`~.errors.BundleError` when it is missing, damaged
        or trained for other weights."""
        from safetensors import SafetensorError, safe_open

        path = Path(directory) / REGIONS_FILE
        if not path.is_file():
            raise BundleError(f"model {Path(directory).name!r} has no learned regions "
                              f"({REGIONS_FILE}); the shipped ones are --model accurate's")
        try:
            with safe_open(str(path), framework="numpy") as handle:
                metadata = handle.metadata() or {}
                tensors = {key: handle.get_tensor(key) for key in handle.keys()}
            stages = tuple(tuple(int(v) for v in s) for s in json.loads(metadata["stages"]))
            found = cls(tensors["weight"], tensors["mean"], tensors["scale"], stages,
                        int(metadata["locations"]), json.loads(metadata.get("facts", "{}")),
                        tensors.get("importance"))
            trained_for = metadata["model_fingerprint"]
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as exc:
            raise BundleError(f"{path} is damaged ({type(exc).__name__}: {exc})") from exc
        channels = sum(c for _, _, c in stages)
        if found.weight.ndim != 2 or found.weight.shape[1] != channels or \
                found.mean.shape != (channels,) or found.scale.shape != (channels,) or \
                (found.importance is not None and found.importance.shape != (channels,)):
            raise BundleError(f"{path} is damaged: its shapes do not match its stages")
        if trained_for != fingerprint:
            raise BundleError(f"{path} was trained for other weights ({trained_for[:12]}); "
                              "train the regions again for this model")
        return found


class DescribeNet(nn.Module):
    """Images ``(B, 3, S, S)`` -> descriptions ``(B, D + L * dim [+ L])``: the model's own
    unit embedding, then its ``L`` unit region vectors, row-major, then (a weighted map) the
    ``L`` query-region weights; one pass of the trunks."""

    def __init__(self, net: EmbeddingNet, region_map: RegionMap) -> None:
        super().__init__()
        self.net = net.eval()
        self.keys = [(trunk, stage) for trunk, stage, _ in region_map.stages]
        self.locations = region_map.locations
        # The standardisation folded into the map: W ((x - mean) * scale) = A x + c.
        scaled = region_map.weight * region_map.scale[None, :]
        self.register_buffer("projection", torch.from_numpy(scaled.astype(np.float32)))
        self.register_buffer("offset", torch.from_numpy(
            (-(scaled.astype(np.float64) @ region_map.mean)).astype(np.float32)))
        # Of the importance, only the scaled part: its offset is the same at every location,
        # and a softmax over the locations ignores it.
        self.register_buffer("importance", None if region_map.importance is None else
                             torch.from_numpy((region_map.importance * region_map.scale)
                                              .astype(np.float32)))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features, maps = self.net.features_and_maps(images, self.keys)
        embedding = self.net.project(features)
        tokens = torch.cat([pool_locations(x.float(), self.locations) for x in maps], dim=1)
        regions = torch.matmul(self.projection, tokens) + self.offset[:, None]  # (B, dim, L)
        parts = [embedding, F.normalize(regions, dim=1).transpose(1, 2).flatten(1)]
        if self.importance is not None:
            parts.append(torch.matmul(self.importance, tokens).softmax(dim=-1))  # (B, L)
        return torch.cat(parts, dim=1)
