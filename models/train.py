"""Siamese training: one Trainer, one model bundle out.

The settings are :class:`~.train_config.TrainConfig`; the frozen-trunk feature cache is
:mod:`.feature_cache`, devices :mod:`.device`, the training curve :mod:`.curves`, and the
validation score an evaluator handed in (by default :mod:`lookalike.core.scoring` on the
seeded candidate sets), so training imports nothing from ``evaluation``.

The recipe in short: pairs of look-alike images go through one shared :class:`EmbeddingNet`;
a loss from :mod:`.losses` (optionally fed by a miner, and by FAISS hard-negative batches from
:mod:`.mining`) pulls each pair together and pushes in-batch negatives apart. After every
epoch the model ranks held-out candidate sets (the same sets ``lookalike evaluate`` scores);
the best epoch by top-1 is kept and training stops when top-1 has not improved for
``patience`` epochs.

Two speeds:

* ``trainable_stages = 0`` (frozen trunk): backbone features of every training image are
  computed once per augmented *view* (view 0 is the plain inference transform) and cached
  on disk, keyed by everything they depend on; then each step only runs the head, so an
  epoch takes seconds on a CPU and ablations reuse the cache;
* ``trainable_stages > 0``: images are decoded and augmented on the fly and the last stages
  of each trunk are fine-tuned at ``backbone_lr`` (the head at ``lr``), under bf16 autocast
  on a CPU and fp16 AMP on a GPU.

State lives in ``work_dir``: ``checkpoint.pt`` (our own file, read back with
``weights_only=True``) after every epoch and on every stop, ``best.safetensors``,
``history.json`` and ``training-curve.png``. ``resume=True`` continues from the saved step;
steps are seeded by ``(seed, step)``, so a resumed run draws what the uninterrupted run would.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from ..core.files import atomic_write
from ..core.scoring import CandidateSetEvaluator, Evaluator
from .bundle import load_bundle, save_bundle
from .curves import plot_history
from .data import (
    DataError,
    ImageDataset,
    PairData,
    TrainPairs,
    load_class_folders,
    load_labelled_pairs,
    load_tll_pairs,
    split,
)
from .device import autocast, device_for, hardware
from .embedder import Embedder
from .feature_cache import FeatureCache
from .losses import build_loss
from .mining import HardNegativeBatches, build_miner, random_batches
from .network import EmbeddingNet, FrozenPart
from .train_config import TrainConfig, TrainConfigError

__all__ = ["TrainConfig", "TrainConfigError", "Trainer", "TrainResult", "train"]

@dataclass
class TrainResult:
    bundle: Path
    fingerprint: str
    metrics: dict[str, float]
    """Validation metrics of the saved bundle, measured end to end through the Embedder."""
    best_epoch: int
    steps: int
    minutes: float


def load_data(config: TrainConfig) -> PairData:
    if config.pairs:
        return load_tll_pairs(config.pairs, config.left_dir, config.right_dir)
    if config.labelled:
        return load_labelled_pairs(config.labelled, config.image_root)
    return load_class_folders(config.classes, seed=config.split_seed)


class Trainer:
    """Train an :class:`EmbeddingNet` on look-alike pairs; see the module docstring."""

    def __init__(
        self,
        config: TrainConfig,
        evaluator: Evaluator | None = None,
        fold: tuple[int, int] | None = None,
        hold_out: bool = True,
        facts: dict[str, Any] | None = None,
    ) -> None:
        """``evaluator`` scores the validation images' vectors after every epoch; by
        default the seeded candidate sets of the validation split.

        ``fold = (k, K)`` validates on fold ``k`` of a ``K``-fold cross-validation instead
        of the ``val_fraction`` split, and keeps the *last* epoch (no early stopping): a
        cross-validated figure must not come from an epoch chosen on the fold it reports.
        A fold is resumed whole (:mod:`lookalike.evaluation.crossval`), so it writes no
        per-epoch checkpoint or curve: on a loaded 2-core machine those cost more than
        the head's training steps.

        ``hold_out=False`` trains on every pair for the recipe's epochs and keeps the last
        (the final model of a cross-validated recipe, whose figures are the CV's); ``facts``
        are recorded in the bundle's ``extra`` (e.g. those CV figures).
        """
        config.validate()
        self.config = config
        self.device = device_for(config.device)
        self.data = load_data(config)
        self.train_pairs, self.val = split(
            self.data, config.val_fraction, config.foils, seed=config.split_seed, fold=fold,
            hold_out=hold_out,
        )
        self.keep_last = fold is not None or not hold_out
        self.hold_out = hold_out
        self.facts = facts or {}
        self.evaluator = evaluator or CandidateSetEvaluator(
            self.val.queries, self.val.candidates, self.val.answers
        )
        torch.manual_seed(config.seed)
        self.net = EmbeddingNet(config.model_config(), pretrained=True)
        self.net.set_trainable_stages(config.trainable_stages)
        self.loss = build_loss(
            config.loss, config.margin, config.temperature, self.net.config.embedding_dim
        )
        self.miner = build_miner(config.miner, config.margin)
        self.batcher = (
            HardNegativeBatches(config.batch_size, config.hard_neighbours)
            if config.hard_negatives else None
        )
        self.frozen = config.trainable_stages == 0
        self.parts_cached = not self.frozen and config.cache_frozen
        self.train_parts: list[FrozenPart] = []
        self.val_parts: list[FrozenPart] = []
        self.cache = FeatureCache(self.net, config, self.device)
        self.preprocessor = self.cache.preprocessor
        self.train_features: torch.Tensor | None = None
        self.val_features: torch.Tensor | None = None
        self.batches_per_epoch = len(random_batches(
            len(self.train_pairs.first), config.batch_size, np.random.default_rng(0)
        ))
        # The schedule ignores max_steps, so a run stopped early and resumed follows the
        # same learning rates as one that never stopped.
        self.total_steps = config.epochs * self.batches_per_epoch
        self.optimizer = self._optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._schedule)
        self.scaler = torch.amp.GradScaler(enabled=self.device.type == "cuda" and not self.frozen)
        self.state: dict[str, Any] = {
            "step": 0, "epoch": 0, "batch": 0, "best": -1.0, "best_epoch": -1, "stale": 0,
            "history": [], "seconds": 0.0, "batches": [],
        }

    # -- set-up ---------------------------------------------------------------------------

    def _optimizer(self) -> torch.optim.Optimizer:
        trunk = [p for p in self.net.trunks.parameters() if p.requires_grad]
        head = [p for name, p in self.net.named_parameters()
                if p.requires_grad and not name.startswith("trunks.")]
        head += list(self.loss.parameters())
        groups = [{"params": head, "lr": self.config.lr}]
        if trunk:
            groups.append({"params": trunk, "lr": self.config.backbone_lr})
        return torch.optim.AdamW(groups, weight_decay=self.config.weight_decay)

    def _schedule(self, step: int) -> float:
        """Linear warm-up, then cosine decay to zero over ``total_steps``."""
        total = max(1, self.total_steps)
        warm = max(1, int(self.config.warmup * total))
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    def _prepare(self) -> None:
        """Cache features (frozen trunk) and fit the standardisation on training images."""
        if self.frozen:
            # One cache of every image of the data, so every split and cross-validation
            # fold indexes the same features instead of computing its own.
            evaluating_only = not self.config.epochs and self.net.standardize is None
            views = 1 if evaluating_only else self.config.views
            images = self.data.images
            features = self.cache.get(images, views, "all")
            rows = {path: row for row, path in enumerate(images)}
            self.val_features = features[0, [rows[path] for path in self.val.images]]
            if evaluating_only:
                return  # the untrained model: no training features needed
            self.train_features = features[:, [rows[path] for path in self.train_pairs.images]]
            plain = self.train_features[0].float()
        elif self.parts_cached:
            images = self.data.images
            parts = self.cache.get_parts(images, self.config.views, "all",
                                         self.config.trainable_stages)
            rows = {path: row for row, path in enumerate(images)}
            train = [rows[path] for path in self.train_pairs.images]
            val = [rows[path] for path in self.val.images]
            self.train_parts = [FrozenPart(p.prefix[:, train], p.boundary[:, train])
                                for p in parts]
            self.val_parts = [FrozenPart(p.prefix[0, val], p.boundary[0, val]) for p in parts]
            plain = self._features_of([FrozenPart(p.prefix[0], p.boundary[0])
                                       for p in self.train_parts])
        else:
            plain = self.cache.compute(self.train_pairs.images, augment=False, seed=0,
                                       desc="standardisation features")
        if self.net.standardize is not None:
            self.net.standardize.fit(plain.float())

    # -- embedding ------------------------------------------------------------------------

    @torch.no_grad()
    def embed(self, images: Sequence[Path], features: torch.Tensor | None) -> np.ndarray:
        """Unit vectors of ``images`` with the current weights (eval mode, no augmentation)."""
        self.net.eval()
        if features is None:
            features = self.cache.compute(images, augment=False, seed=0, desc="embedding")
        return self.net.project(features.float().to(self.device)).cpu().numpy()

    @torch.no_grad()
    def _features_of(self, parts: list[FrozenPart], batch_size: int = 256) -> torch.Tensor:
        """Features of cached frozen parts through the current trainable stages (eval mode)."""
        self.net.eval()
        chunks = []
        for start in range(0, len(parts[0].prefix), batch_size):
            batch = [FrozenPart(p.prefix[start:start + batch_size].float().to(self.device),
                                p.boundary[start:start + batch_size].float().to(self.device))
                     for p in parts]
            with autocast(self.device):
                chunks.append(self.net.features_from(batch, self.config.trainable_stages)
                              .float().cpu())
        return torch.cat(chunks)

    def validate(self) -> dict[str, float]:
        features = self._features_of(self.val_parts) if self.parts_cached else self.val_features
        vectors = self.embed(self.val.images, features)
        return self.evaluator(vectors)

    def _epoch_batches(self, epoch: int) -> list[np.ndarray]:
        rng = np.random.default_rng([self.config.seed, epoch])
        pairs = self.train_pairs
        if self.batcher is None:
            return random_batches(len(pairs.first), self.config.batch_size, rng)
        plain = self.train_features[0] if self.frozen else None
        vectors = self.embed(pairs.images, plain)
        self.batcher.refresh(vectors[pairs.first], vectors[pairs.second])
        return self.batcher.batches(rng)

    # -- one step -------------------------------------------------------------------------

    def _inputs(
        self, images: np.ndarray, rng: np.random.Generator
    ) -> torch.Tensor | list[FrozenPart]:
        """Features (frozen: a random cached view per image), cached frozen parts (likewise),
        or augmented image tensors."""
        if self.frozen:
            views = rng.integers(0, self.train_features.shape[0], size=len(images))
            return self.train_features[views, images].float().to(self.device)
        if self.parts_cached:
            views = rng.integers(0, self.train_parts[0].prefix.shape[0], size=len(images))
            return [FrozenPart(
                p.prefix[views, images].float().to(self.device),
                p.boundary[views, images].float().to(self.device).contiguous(
                    memory_format=torch.channels_last))
                for p in self.train_parts]
        dataset = ImageDataset([self.train_pairs.images[i] for i in images], self.preprocessor,
                               self.cache.augment)
        batch = torch.stack([dataset[i] for i in range(len(dataset))]).to(self.device)
        return batch.contiguous(memory_format=torch.channels_last)

    def step(self, batch: np.ndarray) -> float:
        """One optimisation step on pair indices ``batch``; returns the loss."""
        step = self.state["step"]
        rng = np.random.default_rng([self.config.seed, step, 1])
        torch.manual_seed(self.config.seed * 1_000_003 + step)
        pairs: TrainPairs = self.train_pairs
        images = np.concatenate([pairs.first[batch], pairs.second[batch]])
        labels = torch.from_numpy(pairs.labels[images]).to(self.device)
        self.net.train()
        self.loss.train()
        inputs = self._inputs(images, rng)
        if self.frozen:
            embeddings = self.net.project(inputs)
        else:
            with autocast(self.device):
                features = (self.net.features_from(inputs, self.config.trainable_stages)
                            if self.parts_cached else self.net.features(inputs))
            embeddings = self.net.project(features)
        indices = self.miner(embeddings, labels) if self.miner is not None else None
        loss = self.loss(embeddings, labels, indices)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.state["step"] = step + 1
        return float(loss.detach())

    # -- checkpoints ----------------------------------------------------------------------

    @property
    def work_dir(self) -> Path:
        return self.config.work_dir

    def save_checkpoint(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        state = dict(self.state)
        state["history"] = json.dumps(state["history"])
        state["batches"] = [torch.from_numpy(np.asarray(b)) for b in state["batches"]]
        checkpoint = {
            "net": self.net.state_dict(),
            "loss": self.loss.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "state": state,
            "config": json.dumps(self._fixed_settings()),
        }
        atomic_write(self.work_dir / "checkpoint.pt", lambda tmp: torch.save(checkpoint, tmp))

    def _checkpoint(self) -> None:
        if not self.keep_last:
            self.save_checkpoint()

    def _fixed_settings(self) -> dict[str, Any]:
        return {k: v for k, v in self.config.to_dict().items() if k not in TrainConfig.RESUMABLE}

    def load_checkpoint(self) -> None:
        path = self.work_dir / "checkpoint.pt"
        if not path.is_file():
            raise TrainConfigError(f"nothing to resume: no checkpoint at {path}")
        checkpoint = torch.load(path, map_location=self.device, weights_only=True)
        saved = json.loads(checkpoint["config"])
        changed = sorted(k for k, v in self._fixed_settings().items() if saved.get(k) != v)
        if changed:
            raise TrainConfigError(
                f"cannot resume {path}: settings changed since it was saved: {', '.join(changed)}"
            )
        self.net.load_state_dict(checkpoint["net"])
        self.loss.load_state_dict(checkpoint["loss"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.scaler.load_state_dict(checkpoint["scaler"])
        state = dict(checkpoint["state"])
        state["history"] = json.loads(state["history"])
        state["batches"] = [b.numpy() for b in state["batches"]]
        self.state = state

    def _save_best(self) -> None:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.net.state_dict().items()}
        atomic_write(self.work_dir / "best.safetensors", lambda tmp: save_file(state, str(tmp)))

    # -- the loop -------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train, then write the kept epoch's weights as a bundle measured end to end."""
        self.train_epochs()
        return self._finish()

    def train_epochs(self) -> None:
        """The training loop: epochs of steps, validation and a checkpoint after each."""
        started = time.perf_counter()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self._prepare()
        if self.config.resume:
            self.load_checkpoint()
        else:
            self._record(epoch=0, loss=None, metrics=self.validate())
        seconds_before = self.state["seconds"]
        config = self.config
        stopped = False
        while self.state["epoch"] < config.epochs and not stopped:
            epoch = self.state["epoch"] + 1
            if self.state["batch"] == 0:
                self.state["batches"] = self._epoch_batches(epoch)
            batches = self.state["batches"]
            losses: list[float] = []
            bar = tqdm(total=len(batches), initial=self.state["batch"], unit="step",
                       desc=f"epoch {epoch}/{config.epochs}", disable=not config.progress)
            while self.state["batch"] < len(batches):
                if config.max_steps and self.state["step"] >= config.max_steps:
                    stopped = True
                    break
                losses.append(self.step(batches[self.state["batch"]]))
                self.state["batch"] += 1
                bar.update(1)
                bar.set_postfix(loss=f"{losses[-1]:.4f}", val_top1=f"{self.state['best']:.3f}")
            bar.close()
            self.state["seconds"] = seconds_before + time.perf_counter() - started
            if stopped and self.state["batch"] < len(batches):
                self._checkpoint()
                break
            self.state.update(epoch=epoch, batch=0, batches=[])
            self._record(epoch, float(np.mean(losses)) if losses else None, self.validate())
            self._checkpoint()
            if self.state["stale"] >= config.patience and not self.keep_last:
                break
        self.state["seconds"] = seconds_before + time.perf_counter() - started

    def _record(self, epoch: int, loss: float | None, metrics: dict[str, float]) -> None:
        entry = {"epoch": epoch, "step": self.state["step"], "loss": loss,
                 "minutes": self.state["seconds"] / 60, **metrics}
        self.state["history"].append(entry)
        if self.keep_last:  # the weights in memory are the ones kept
            self.state.update(best=metrics["top1"], best_epoch=epoch, stale=0)
        elif metrics["top1"] > self.state["best"]:
            self.state.update(best=metrics["top1"], best_epoch=epoch, stale=0)
            self._save_best()
        else:
            self.state["stale"] += 1
        if self.config.progress:
            shown = "-" if loss is None else f"{loss:.4f}"
            tqdm.write(f"epoch {epoch}: loss {shown}  val top1 {metrics['top1']:.3f}  "
                       f"top5 {metrics['top5']:.3f}  mrr {metrics['mrr']:.3f}")
        atomic_write(self.work_dir / "history.json", json.dumps(self.state["history"], indent=1))
        if not self.keep_last:
            plot_history(self.state["history"], self.work_dir / "training-curve.png")

    def _finish(self) -> TrainResult:
        """Write the best weights as a bundle, then measure it end to end and record that."""
        if not self.keep_last:
            self.net.load_state_dict(load_file(str(self.work_dir / "best.safetensors")))
        history = self.state["history"]
        best_entry = next(h for h in history if h["epoch"] == self.state["best_epoch"])
        minutes = self.state["seconds"] / 60
        extra = {
            "recipe": self.config.to_dict(),
            "data": {
                **self.data.summary(),
                "train_pairs": len(self.train_pairs.first),
                "train_images": len(self.train_pairs.images),
                "validation_sets": len(self.val.sets) if self.hold_out else 0,
                "candidates_per_set": self.config.foils + 1,
            },
            "training": {
                "loss": self.config.loss, "best_epoch": self.state["best_epoch"],
                "steps": self.state["step"], "minutes": round(minutes, 2),
                "hardware": hardware(),
                "validation_during_training": {k: best_entry[k] for k in ("top1", "top5", "mrr")},
            },
            **self.facts,
        }
        out = self.config.out
        if not self.hold_out:
            # Nothing was held out: the sets are training pairs, a measure of fit only.
            extra["training"]["fit_on_training_pairs"] = extra["training"].pop(
                "validation_during_training")
            self.net.config = dataclasses.replace(self.net.config, extra=extra)
            fingerprint = save_bundle(self.net, out, precision=self.config.precision)
            return TrainResult(out, fingerprint, extra["training"]["fit_on_training_pairs"],
                               self.state["best_epoch"], self.state["step"], minutes)
        model = dataclasses.replace(self.net.config, extra=extra)
        self.net.config = model
        save_bundle(self.net, out, precision=self.config.precision)
        # The saved (possibly fp16 or int8) weights, through the real inference path.
        bundle = load_bundle(out)
        embedder = Embedder(bundle)
        vectors = np.zeros((len(self.val.images), embedder.dim), np.float32)
        for batch in embedder.embed_files(self.val.images, batch_size=32):
            if batch.errors:
                raise DataError(f"cannot embed validation images: {batch.errors}")
            vectors[batch.indices] = batch.vectors
        metrics = self.evaluator(vectors)
        extra["validation"] = metrics
        self.net.config = dataclasses.replace(model, extra=extra)
        fingerprint = save_bundle(self.net, out, precision=self.config.precision)
        curve = self.work_dir / "training-curve.png"
        if curve.is_file():
            shutil.copy(curve, out / curve.name)
        return TrainResult(out, fingerprint, metrics, self.state["best_epoch"],
                           self.state["step"], minutes)


def train(config: TrainConfig) -> TrainResult:
    """Run one training configuration end to end."""
    return Trainer(config).fit()
