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

from ..core.files import atomic_write
from .data import Augment, ImageDataset
from .device import autocast
from .network import EmbeddingNet
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

    def _key(self, images: Sequence[Path], view: int) -> str:
        model = self.net.config
        config = self.config
        facts = {
            "backbones": model.backbones, "taps": model.taps, "pooling": model.pooling,
            "grid_taps": model.grid_taps, "grid": model.grid,
            "size": model.input_size, "view": view,
            "augment": [config.seed, config.crop_scale, config.flip, config.jitter] if view else [],
            "images": [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in images],
        }
        return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:16]

    def get(self, images: Sequence[Path], views: int, label: str) -> torch.Tensor:
        """``(views, len(images), F)`` float16 features; view 0 is un-augmented.

        Each view is its own file, so a run with fewer views reuses a run's with more.
        """
        outs = []
        for view in range(views):
            name = f"features-{label}-{self._key(images, view)}.safetensors"
            path = self.config.feature_cache / name
            if path.is_file():
                outs.append(load_file(str(path))["features"])
                continue
            features = self.compute(
                images, augment=view > 0, seed=self.config.seed * 1000 + view,
                desc=f"features {label} view {view + 1}/{views}",
            ).half()
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {"features": features.contiguous()}
            atomic_write(path, lambda tmp, tensors=tensors: save_file(tensors, str(tmp)))
            outs.append(features)
        return torch.stack(outs)

    def compute(self, images: Sequence[Path], augment: bool, seed: int, desc: str) -> torch.Tensor:
        torch.manual_seed(seed)
        dataset = ImageDataset(images, self.preprocessor, self.augment if augment else None)
        loader = torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=0)
        net = self.net.eval().to(self.device, memory_format=torch.channels_last)
        chunks = []
        with torch.inference_mode(), autocast(self.device):
            for batch in tqdm(loader, desc=desc, unit="batch", disable=not self.config.progress):
                batch = batch.to(self.device).contiguous(memory_format=torch.channels_last)
                chunks.append(net.features(batch).float().cpu())
        return torch.cat(chunks)
