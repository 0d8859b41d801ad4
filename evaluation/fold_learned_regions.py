"""Trained region late interaction, measured on the cross-validation folds (issue 14).

:mod:`.fold_rerank` scores candidates by MaxSim over region vectors that were never trained
for it (untrained trunk channels, or the global head's per-location terms). Here the regions
are *learned*, as ColBERT learns its token vectors: each image's 49 locations (stages 4-7 of
the recipe's frozen trunks pooled to 7 x 7, standardised: :func:`~.fold_rerank.trunk_7x7`)
go through one linear map ``W`` to ``dim`` values and unit length, and ``W`` is trained on the
fold's *training* pairs with a symmetric InfoNCE over the in-batch MaxSim scores (query ->
candidate). The fold's held-out sets are then scored by ``cosine + lam * learned MaxSim``
with the fold model's cosine, ``lam`` chosen per fold on the other folds (nested), so every
figure is out of fold; verification pairs too (``lam`` nested on AUC).

Needs a CV row run with ``--keep-fold-models`` and the region cache of :mod:`.fold_rerank`::

    python -m lookalike.evaluation.fold_learned_regions --config models/recipes/accurate.toml \\
        --cv-dir data/train/cv/e30-lite01/model.work/cv
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.scoring import set_metrics
from ..models.feature_cache import FeatureCache
from ..models.network import EmbeddingNet
from ..models.train import TrainConfig, load_data
from .fold_rerank import (
    Fold,
    cell,
    figures,
    load_folds,
    machine,
    nested,
    nested_verification,
    pair_matrix,
    region_cache,
    signed,
    trunk_7x7,
    tta_vectors,
)


def batch_maxsim(queries: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """``(B, R, D)`` and ``(C, S, D)`` unit regions -> ``(B, C)``: each query's mean over its
    regions of the best cosine among each candidate's regions (differentiable)."""
    return torch.einsum("ird,jsd->ijrs", queries, candidates).amax(dim=3).mean(dim=2)


def train_projection(tokens: torch.Tensor, pairs: np.ndarray, dim: int = 128, epochs: int = 20,
                     temperature: float = 0.05, weight_decay: float = 0.01, lr: float = 1e-3,
                     batch_size: int = 128, seed: int = 0) -> torch.nn.Linear:
    """Train ``W`` (``tokens``' width -> ``dim``, no bias) so that a pair ``(first, second)``
    of ``pairs`` (rows of ``tokens``) has a higher MaxSim than the batch's other pairs
    (symmetric InfoNCE at ``temperature``; AdamW, one-cycle schedule)."""
    torch.manual_seed(seed)
    projection = torch.nn.Linear(tokens.shape[2], dim, bias=False)
    optimiser = torch.optim.AdamW(projection.parameters(), lr=lr, weight_decay=weight_decay)
    # One-cycle: 10% warm-up, then cosine decay; a short run (a smoke test) keeps >= 2 warm-up
    # steps, which the scheduler needs, and may stop before the cycle ends.
    steps = max(3, epochs * -(-len(pairs) // batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, lr, total_steps=steps,
                                                   pct_start=max(0.1, 2 / steps))
    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        order = rng.permutation(len(pairs))
        for start in range(0, len(order), batch_size):
            batch = torch.from_numpy(pairs[order[start:start + batch_size]])
            first = F.normalize(projection(tokens[batch[:, 0]]), dim=-1)
            second = F.normalize(projection(tokens[batch[:, 1]]), dim=-1)
            logits = batch_maxsim(first, second) / temperature
            target = torch.arange(len(batch))
            loss = 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
    return projection


def project(projection: torch.nn.Linear, tokens: torch.Tensor) -> np.ndarray:
    """``(N, L, C)`` tokens -> ``(N, L, dim)`` unit learned regions."""
    with torch.no_grad():
        return F.normalize(projection(tokens), dim=-1).numpy()


def fold_training_pairs(pairs: np.ndarray, fold: Fold) -> np.ndarray:
    """The pairs (rows of the image list) a fold's model trained on: those sharing no image
    with the fold's validation images."""
    held_out = np.isin(pairs, fold.rows).any(axis=1)
    return pairs[~held_out]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", type=Path, required=True, help="the CV row's recipe")
    parser.add_argument("--cv-dir", type=Path, required=True,
                        help="WORK_DIR/cv of 'lookalike train --cv K --keep-fold-models'")
    parser.add_argument("--region-cache", type=Path, default=Path("data/train/region-cache"))
    parser.add_argument("--dim", type=int, default=128, help="learned region width")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--json", type=Path, help="write the per-fold figures here")
    args = parser.parse_args(argv)
    config = TrainConfig.from_file(args.config, progress=False)
    print(f"machine: {machine()}", flush=True)
    started = time.perf_counter()
    data = load_data(config)
    rows = {str(p): i for i, p in enumerate(data.images)}
    net = EmbeddingNet(config.model_config(), pretrained=False)
    features = FeatureCache(net, config, torch.device("cpu")).get(data.images, 1, "all")[0]
    features = features.float().numpy().astype(np.float64)
    cache = region_cache(config, data.images, args.region_cache)
    mirror = cache["mirror"].float().numpy().astype(np.float64)[:, :features.shape[1]]
    maps = {k: v.float().numpy() for k, v in cache.items() if k != "mirror"}
    tokens = torch.from_numpy(trunk_7x7(maps, len(config.backbones)).astype(np.float32))
    pairs = np.array([(rows[str(data.first_paths[a])], rows[str(data.second_paths[b])])
                      for (a, b), label in zip(data.pairs, data.targets, strict=True) if label])
    folds = load_folds(args.cv_dir, data.images)
    if any(f.head is None for f in folds):
        raise SystemExit(f"{args.cv_dir}: fold heads missing; re-run the row with "
                         "--keep-fold-models")
    cosines: dict[str, list[np.ndarray]] = {"plain": [], "flip TTA": []}
    pair_cosines: dict[str, list[np.ndarray]] = {"plain": [], "flip TTA": []}
    lates, pair_lates, answers = [], [], []
    for fold in folds:
        projection = train_projection(tokens, fold_training_pairs(pairs, fold), args.dim,
                                      args.epochs, args.temperature, args.weight_decay,
                                      seed=fold.number)
        regions = project(projection, tokens[torch.from_numpy(fold.rows)])
        tta = tta_vectors(fold, features, mirror)
        for name, vectors in (("plain", fold.vectors), ("flip TTA", tta)):
            cosines[name].append(fold.cosines(vectors))
            pair_cosines[name].append(pair_matrix(fold, vectors))
        lates.append(fold.late(regions, False))
        pair_lates.append(pair_matrix(fold, None, regions))
        answers.append(fold.answers)
        print(f"fold {fold.number}: learned MaxSim alone top-1 "
              f"{set_metrics(lates[-1], fold.answers)['top1']:.3f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)

    report: dict[str, object] = {"machine": machine(), "settings": vars(args) | {
        "config": str(args.config), "cv_dir": str(args.cv_dir), "json": None,
        "region_cache": str(args.region_cache)}}
    base = [set_metrics(c, a) for c, a in zip(cosines["plain"], answers, strict=True)]
    alone = [set_metrics(li, a) for li, a in zip(lates, answers, strict=True)]
    print(f"\nlearned regions {args.dim}-d, {args.epochs} epochs, temperature "
          f"{args.temperature}, weight decay {args.weight_decay}\n\n| scoring | lam per fold "
          "| top-1 | top-5 | MRR | paired top-1 |\n|---|---|---|---|---|---|")
    print(f"| fold model (plain cosine) | | {cell([m['top1'] for m in base])} | "
          f"{cell([m['top5'] for m in base])} | {cell([m['mrr'] for m in base])} | |")
    print(f"| learned MaxSim alone | | {cell([m['top1'] for m in alone])} | "
          f"{cell([m['top5'] for m in alone])} | {cell([m['mrr'] for m in alone])} | |")
    for name, cos in cosines.items():
        chosen, found = nested(cos, lates, answers)
        gain = [m["top1"] - b["top1"] for m, b in zip(found, base, strict=True)]
        print(f"| {name} cosine + lam x learned MaxSim | {chosen} | "
              f"{cell([m['top1'] for m in found])} | {cell([m['top5'] for m in found])} | "
              f"{cell([m['mrr'] for m in found])} | {signed(gain)} "
              f"{[round(g, 3) for g in gain]} |")
        report[f"sets/{name}"] = {"lam": chosen, "metrics": found}

    cosine_only = {name: [figures(c) for c in cos] for name, cos in pair_cosines.items()}
    plain = cosine_only["plain"]
    print("\n| verification score | lam per fold | AUC | EER | TMR @ 1% FMR | paired AUC |\n"
          "|---|---|---|---|---|---|")
    for name, cos in pair_cosines.items():
        lams, nested_found = nested_verification(cos, pair_lates)
        for label, found, chosen in (
                (f"{name} cosine", cosine_only[name], ""),
                (f"{name} cosine + lam x learned MaxSim", nested_found, lams)):
            gain = signed([m["auc"] - b["auc"] for m, b in zip(found, plain, strict=True)])
            print(f"| {label} | {chosen} | {cell([m['auc'] for m in found])} | "
                  f"{cell([m['eer'] for m in found])} | {cell([m['tmr_at_far'] for m in found])}"
                  f" | {gain} |")
            report[f"verification/{label}"] = {"lam": chosen, "metrics": found}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    print(f"\ndone in {time.perf_counter() - started:.0f} s; {machine()}")


if __name__ == "__main__":
    main()
