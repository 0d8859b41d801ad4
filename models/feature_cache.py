"""Frozen-trunk training's feature cache: pooled trunk features per image and view, on disk."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..core.files import atomic_write, images_identity
from .data import Augment, ImageDataset
from .device import autocast
from .network import EmbeddingNet, FrozenPart
from .preprocess import Preprocessor

if TYPE_CHECKING:
    from .train_config import TrainConfig

__all__ = ["FeatureCache"]


class FeatureCache:
    """Pooled trunk features of a fixed list of images, per augmented view, on disk.

    The file name is a digest of everything the features depend on (trunks, taps, pooling,
    input transform, augmentation, seed, the image files), so a changed setting never
    reuses stale features and an unchanged one never recomputes them.
    """

    def __init__(self, net: EmbeddingNet, config: TrainConfig, device: torch.device) -> None:
        self.net, self.config, self.device = net, config, device
        model = net.config
        self.preprocessor = Preprocessor(model.input_size, model.mean, model.std)
        self.augment = Augment(model.input_size, config.crop_scale, config.flip, config.jitter)

    def _key(self, images: Sequence[Path], view: int, trainable: int = 0) -> str:
        model = self.net.config
        config = self.config
        facts = {
            "backbones": model.backbones, "taps": model.taps, "pooling": model.pooling,
            "grid_taps": model.grid_taps, "grid": model.grid,
            "size": model.input_size, "view": view,
            "augment": [config.seed, config.crop_scale, config.flip, config.jitter] if view else [],
            "images": images_identity(images),
        }
        if trainable:
            facts["trainable"] = trainable
        return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]

    def get(self, images: Sequence[Path], views: int, label: str) -> torch.Tensor:
        """``(views, len(images), F)`` float16 features; view 0 is un-augmented.

        Each view is its own file, so a run with fewer views reuses a run's with more.
        """
        return torch.stack([self._view(images, view, views, label, 0)["features"]
                            for view in range(views)])

    def get_parts(
        self, images: Sequence[Path], views: int, label: str, trainable: int
    ) -> list[FrozenPart]:
        """Per trunk, what its frozen stages give (:meth:`EmbeddingNet.frozen_part`) when the
        last ``trainable`` stages are fine-tuned, float16 with a leading ``views`` axis: an
        epoch then runs only the trainable stages (augmentation: the cached views)."""
        loaded = [self._view(images, view, views, label, trainable) for view in range(views)]
        return [
            FrozenPart(torch.stack([v[f"t{i}.prefix"] for v in loaded]),
                       torch.stack([v[f"t{i}.boundary"] for v in loaded]))
            for i in range(len(self.net.trunks))
        ]

    def _view(
        self, images: Sequence[Path], view: int, views: int, label: str, trainable: int
    ) -> dict[str, torch.Tensor]:
        kind = f"frozen{trainable}" if trainable else "features"
        path = self.config.feature_cache / f"{kind}-{label}-{self._key(images, view, trainable)}" \
            ".safetensors"
        if path.is_file():
            return load_file(str(path))
        tensors = {
            name: value.half().contiguous()
            for name, value in self._compute(
                images, augment=view > 0, seed=self.config.seed * 1000 + view,
                desc=f"{kind} {label} view {view + 1}/{views}", trainable=trainable,
            ).items()
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))
        return tensors

    def compute(self, images: Sequence[Path], augment: bool, seed: int, desc: str) -> torch.Tensor:
        return self._compute(images, augment, seed, desc)["features"]

    def _compute(
        self, images: Sequence[Path], augment: bool, seed: int, desc: str, trainable: int = 0
    ) -> dict[str, torch.Tensor]:
        """``features`` ``(N, F)``, or with ``trainable`` each trunk's ``t{i}.prefix`` and
        ``t{i}.boundary`` (float32)."""
        torch.manual_seed(seed)
        dataset = ImageDataset(images, self.preprocessor, self.augment if augment else None)
        loader = torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=0)
        net = self.net.eval().to(self.device, memory_format=torch.channels_last)
        chunks: dict[str, list[torch.Tensor]] = {}
        with torch.inference_mode(), autocast(self.device):
            for batch in tqdm(loader, desc=desc, unit="batch", disable=not self.config.progress):
                batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
                if trainable:
                    out = {}
                    for i, part in enumerate(net.frozen_part(batch, trainable)):
                        out[f"t{i}.prefix"], out[f"t{i}.boundary"] = part.prefix, part.boundary
                else:
                    out = {"features": net.features(batch)}
                for name, value in out.items():
                    chunks.setdefault(name, []).append(value.float().cpu().contiguous())
        return {name: torch.cat(parts) for name, parts in chunks.items()}
