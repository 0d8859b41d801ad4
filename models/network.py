"""EmbeddingNet: backbone(s) -> pooling -> fusion (concat) -> projection head -> L2 normalise.

Both branches of the Siamese pair share this one network; a cosine score between two
images is the dot product of their embeddings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .backbones import create_backbone, get_backbone_spec

__all__ = ["EmbeddingConfig", "EmbeddingNet", "ConfigError", "POOLINGS"]


class ConfigError(ValueError):
    """A model configuration that cannot be built."""


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
    """

    backbones: tuple[str, ...] = ("efficientnet_lite0",)
    pooling: str = "avg"
    head: tuple[int, ...] = ()
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
        first = get_backbone_spec(self.backbones[0])
        if not self.input_size:
            object.__setattr__(self, "input_size", first.input_size)
        if not any(self.std):
            object.__setattr__(self, "mean", tuple(first.mean))
            object.__setattr__(self, "std", tuple(first.std))

    @property
    def feature_dim(self) -> int:
        return sum(get_backbone_spec(name).num_features for name in self.backbones)

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
        for key in ("backbones", "head", "mean", "std"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


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
        self.pool = POOLINGS[config.pooling]()
        self.head = _make_head(config.feature_dim, config.head)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled, concatenated backbone features ``(B, F)`` (what a frozen trunk caches)."""
        return torch.cat([self.pool(trunk(images)) for trunk in self.trunks], dim=1)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """Head and L2 normalisation ``(B, F) -> (B, D)``."""
        return F.normalize(self.head(features.float()), dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(images))


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
