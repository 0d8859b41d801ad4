"""EmbeddingNet: backbone(s) -> pooling -> fusion (concat) -> projection head -> L2 normalise.

Both branches of the Siamese pair share this one network; a cosine score between two
images is the dot product of their embeddings. Besides the last feature map, middle stages
of each trunk can be pooled too (``taps``): look-alikes share colour, shape and texture,
which live in middle layers more than in the ImageNet-class features of the last one.
``forward`` is plain tensor operations, so the network exports to ONNX as it is.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import create_backbone, get_backbone_spec, trunk_stages
from .errors import ConfigError

__all__ = ["EmbeddingConfig", "EmbeddingNet", "ConfigError", "FrozenPart", "POOLINGS"]


class GeM(nn.Module):
    """Generalised-mean pooling (Radenović et al.); p=1 is average, p->inf is max pooling."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p)))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(2, 3)).pow(1.0 / self.p)


class AvgPool(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


POOLINGS: dict[str, type[nn.Module]] = {"avg": AvgPool, "gem": GeM}


@dataclass(frozen=True)
class EmbeddingConfig:
    """Everything needed to rebuild an EmbeddingNet; saved as the bundle's ``config.json``.

    ``head`` lists the projection layer widths; empty means identity (pooled backbone
    features, L2-normalised). Input size, mean and std default to the first backbone's.
    ``taps`` are trunk stage indices (see :func:`~.backbones.trunk_stages`; for EfficientNet
    0 = stem, 1-7 = block groups, 8 = head) whose outputs are average-pooled and
    concatenated before the last stage's pooled features, for every backbone.
    ``grid_taps`` are stages pooled over a ``grid`` x ``grid`` layout of cells instead of the
    whole map: where colour and shape sit in the picture, which look-alikes often share.
    ``standardize`` puts a fixed per-feature ``(x - mean) / std`` (fitted on training
    features, stored as buffers) in front of the head, so features of very different scales
    from several stages and backbones weigh alike; ``dropout`` drops features while training.
    """

    backbones: tuple[str, ...] = ("efficientnet_lite0",)
    pooling: str = "avg"
    head: tuple[int, ...] = ()
    taps: tuple[int, ...] = ()
    grid_taps: tuple[int, ...] = ()
    grid: int = 3
    standardize: bool = False
    dropout: float = 0.0
    input_size: int = 0
    mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] = (0.0, 0.0, 0.0)
    extra: dict[str, Any] = field(default_factory=dict)
    """Free-form facts that travel with the model: training recipe, data, metrics, threshold."""

    def __post_init__(self) -> None:
        if not self.backbones:
            raise ConfigError("a model needs at least one backbone")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"unknown pooling {self.pooling!r}; choose one of {sorted(POOLINGS)}")
        if any(width <= 0 for width in self.head):
            raise ConfigError(f"head widths must be positive, got {list(self.head)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.grid < 1:
            raise ConfigError(f"grid must be >= 1, got {self.grid}")
        for name in self.backbones:
            last = len(stage_channels(name)) - 1
            bad = [tap for tap in (*self.taps, *self.grid_taps) if not 0 <= tap < last]
            if bad:
                raise ConfigError(
                    f"backbone {name} has stages 0-{last}; taps must be below the last, got {bad}"
                )
        first = get_backbone_spec(self.backbones[0])
        if not self.input_size:
            object.__setattr__(self, "input_size", first.input_size)
        if not any(self.std):
            object.__setattr__(self, "mean", tuple(first.mean))
            object.__setattr__(self, "std", tuple(first.std))

    @property
    def feature_dim(self) -> int:
        cells = self.grid * self.grid
        return sum(
            sum(stage_channels(name)[tap] for tap in self.taps)
            + cells * sum(stage_channels(name)[tap] for tap in self.grid_taps)
            + stage_channels(name)[-1]
            for name in self.backbones
        )

    @property
    def embedding_dim(self) -> int:
        return self.head[-1] if self.head else self.feature_dim

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmbeddingConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown model config keys: {', '.join(unknown)}")
        values = dict(data)
        for key in ("backbones", "head", "taps", "grid_taps", "mean", "std"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


@functools.cache
def stage_channels(name: str) -> tuple[int, ...]:
    """Output channels of each stage of backbone ``name`` (from one tiny random-init pass).

    The random init runs on a forked RNG: asking for a shape must not change what a seeded
    training run draws next.
    """
    with torch.random.fork_rng(devices=[]):
        trunk, _ = create_backbone(name, pretrained=False)
    channels = []
    with torch.no_grad():
        x = torch.zeros(1, 3, 64, 64)
        for stage in trunk_stages(trunk.eval()):
            x = stage(x)
            channels.append(x.shape[1])
    return tuple(channels)


class Standardize(nn.Module):
    """``(x - mean) / std`` with fixed buffers; identity until :meth:`fit` sets them."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def fit(self, features: torch.Tensor) -> None:
        """Fit on training features ``(N, dim)``."""
        self.mean.copy_(features.mean(0))
        self.std.copy_(features.std(0).clamp(min=1e-6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class FrozenPart(NamedTuple):
    """One trunk's frozen stages' share of the features (see :meth:`EmbeddingNet.frozen_part`)."""

    prefix: torch.Tensor
    """``(B, P)``: the pooled taps of the frozen stages."""
    boundary: torch.Tensor
    """``(B, C, H, W)``: the map that enters the first trainable stage."""


class EmbeddingNet(nn.Module):
    """Images ``(B, 3, S, S)`` -> unit-length embeddings ``(B, D)``."""

    def __init__(
        self,
        config: EmbeddingConfig,
        pretrained: bool = True,
        weights: dict[str, str | Path] | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        weights = weights or {}
        self.trunks = nn.ModuleList(
            create_backbone(name, pretrained=pretrained, weights=weights.get(name))[0]
            for name in config.backbones
        )
        # Views of the trunks' own modules, not registered again: state-dict names stay put.
        self._stages = [trunk_stages(trunk) for trunk in self.trunks]
        self._frozen: list[nn.Module] = []
        self.pool = POOLINGS[config.pooling]()
        self.standardize = Standardize(config.feature_dim) if config.standardize else None
        self.dropout = nn.Dropout(config.dropout) if config.dropout else None
        self.head = _make_head(config.feature_dim, config.head)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled, concatenated backbone features ``(B, F)`` (what a frozen trunk caches):
        per backbone and in stage order, the average-pooled ``taps``, the grid-pooled
        ``grid_taps`` (channel-major: ``C x grid x grid``), then the pooled last stage."""
        return self.features_and_maps(images)[0]

    def features_and_maps(
        self, images: torch.Tensor, keep: Collection[tuple[int, int]] = ()
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """:meth:`features`, and the output maps of the stages ``keep`` names as ``(trunk,
        stage)``, in trunk then stage order, from the same pass (what the learned regions of
        :mod:`.regions_net` pool)."""
        pooled, maps = [], []
        for trunk, stages in enumerate(self._stages):
            x = images
            for index, stage in enumerate(stages):
                x = stage(x)
                pooled += self._taps(index, x)
                if (trunk, index) in keep:
                    maps.append(x)
            pooled.append(self.pool(x))
        return torch.cat(pooled, dim=1), maps

    def _taps(self, index: int, x: torch.Tensor) -> list[torch.Tensor]:
        """What stage ``index``'s output ``x`` adds to the features."""
        pooled = []
        if index in self.config.taps:
            pooled.append(x.mean(dim=(2, 3)))
        if index in self.config.grid_taps:
            pooled.append(grid_pool(x, self.config.grid))
        return pooled

    def frozen_part(self, images: torch.Tensor, trainable: int) -> list[FrozenPart]:
        """Per trunk, what its stages before the last ``trainable`` give: their pooled taps
        ``(B, P)`` and the map entering the first trainable stage. Fixed while those stages
        are frozen, so fine-tuning the last stages can cache it (:mod:`.feature_cache`)."""
        parts = []
        for stages in self._stages:
            x, pooled = images, []
            for index, stage in enumerate(stages[: len(stages) - trainable]):
                x = stage(x)
                pooled += self._taps(index, x)
            prefix = torch.cat(pooled, dim=1) if pooled else x.new_zeros(len(x), 0)
            parts.append(FrozenPart(prefix, x))
        return parts

    def features_from(self, parts: Sequence[FrozenPart], trainable: int) -> torch.Tensor:
        """The features (as :meth:`features`) from each trunk's :meth:`frozen_part`: runs
        only the last ``trainable`` stages."""
        pooled = []
        for stages, part in zip(self._stages, parts, strict=True):
            first = len(stages) - trainable
            x = part.boundary
            if part.prefix.shape[1]:
                pooled.append(part.prefix)
            for index, stage in enumerate(stages[first:], start=first):
                x = stage(x)
                pooled += self._taps(index, x)
            pooled.append(self.pool(x))
        return torch.cat(pooled, dim=1)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Standardisation, head and L2 normalisation ``(B, F) -> (B, D)``."""
        return F.normalize(self.unnormalized(features), dim=1)

    def unnormalized(self, features: torch.Tensor) -> torch.Tensor:
        """Standardisation and head without the L2 normalisation ``(B, F) -> (B, D)``: the
        vector whose per-location split :mod:`.explain_net` computes."""
        x = features.float()
        if self.standardize is not None:
            x = self.standardize(x)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.head(x)

    @property
    def stages(self) -> list[list[nn.Module]]:
        """Each trunk's stages in order (the modules :meth:`features` runs and pools)."""
        return self._stages

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(images))

    def set_trainable_stages(self, count: int) -> None:
        """Train only the last ``count`` stages of each trunk (0: frozen trunk, features can
        be cached). Frozen stages also keep their BatchNorm statistics (stay in eval mode)."""
        self._frozen = []
        for stages in self._stages:
            for index, stage in enumerate(stages):
                trainable = index >= len(stages) - count
                stage.requires_grad_(trainable)
                if not trainable:
                    self._frozen.append(stage)
        self.train(self.training)

    def train(self, mode: bool = True) -> EmbeddingNet:
        super().train(mode)
        for stage in self._frozen:
            stage.eval()
        return self


def grid_pool(x: torch.Tensor, grid: int) -> torch.Tensor:
    """``(B, C, H, W) -> (B, C * grid * grid)``: the mean of each cell of a grid x grid layout.

    The same cells as ``adaptive_avg_pool2d`` (cell i spans ``floor(i*H/g)`` to
    ``ceil((i+1)*H/g)``), written as slices and means so that it exports to ONNX for any map
    size (ONNX has no adaptive pooling where the size is not a multiple of the grid).
    """
    height, width = int(x.shape[2]), int(x.shape[3])
    cells = []
    for i in range(grid):
        top, bottom = (i * height) // grid, -(-((i + 1) * height) // grid)
        for j in range(grid):
            left, right = (j * width) // grid, -(-((j + 1) * width) // grid)
            cells.append(x[:, :, top:bottom, left:right].mean(dim=(2, 3)))
    return torch.stack(cells, dim=2).flatten(1)


def _make_head(in_dim: int, widths: tuple[int, ...]) -> nn.Module:
    """Linear layers with GELU between them; identity when ``widths`` is empty."""
    if not widths:
        return nn.Identity()
    layers: list[nn.Module] = []
    dims = (in_dim, *widths)
    for index, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        if index:
            layers.append(nn.GELU())
        layers.append(nn.Linear(a, b))
    return nn.Sequential(*layers)
