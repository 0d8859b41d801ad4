"""What storing a head as int8 rows (``lookalike train --int8``, the accurate model's bundle)
costs in quality, on the CV row's own folds: each fold head's matrix is rounded the way
:func:`~lookalike.models.bundle.int8_rows` stores it, the fold's validation images are embedded
with both heads from the cached trunk features, and their top-1 and pair ROC-AUC are compared.

    python benchmarks/int8_head.py --config models/recipes/accurate.toml \\
        --cv-dir data/train/accurate/model.work/cv

Needs the row's fold models (``--keep-fold-models``) and ``../shared/tll``.
"""

from __future__ import annotations

import argparse
import dataclasses

import numpy as np
import torch

from lookalike.core.machine import cpu_description
from lookalike.core.scoring import set_metrics
from lookalike.evaluation.fold_rerank import (
    add_row_arguments,
    cached_features,
    figures,
    load_folds,
    pair_matrix,
    row_recipe,
)
from lookalike.models.bundle import from_int8_rows, int8_rows
from lookalike.models.train import load_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_row_arguments(parser)
    args = parser.parse_args()
    config = row_recipe(args)
    data = load_data(config)
    folds = load_folds(args.cv_dir, data.images)
    if any(f.head is None for f in folds):
        raise SystemExit(f"{args.cv_dir}: fold heads missing; re-run the row with "
                         "--keep-fold-models")
    features = cached_features(config, data.images)
    print(f"CPU: {cpu_description()}\n")
    print("| fold | top-1 float32 / int8 | ROC-AUC float32 | int8 - float32 | lowest cosine "
          "between the two embeddings |\n|---|---|---|---|---|")
    gains = []
    for fold in folds:
        stored = int8_rows(torch.from_numpy(fold.head.weight))
        rounded = dataclasses.replace(fold.head, weight=from_int8_rows(*stored).double().numpy())
        full, int8 = (head.embed(features[fold.rows]) for head in (fold.head, rounded))
        top1 = [set_metrics(fold.cosines(v), fold.answers)["top1"] for v in (full, int8)]
        auc = [figures(pair_matrix(fold, v))["auc"] for v in (full, int8)]
        gains.append(auc[1] - auc[0])
        print(f"| {fold.number} | {top1[0]:.3f} / {top1[1]:.3f} | {auc[0]:.5f} | "
              f"{auc[1] - auc[0]:+.5f} | {np.sum(full * int8, axis=1).min():.6f} |")
    print(f"\nmean AUC change {np.mean(gains):+.5f}, largest {max(gains, key=abs):+.5f}")


if __name__ == "__main__":
    main()
