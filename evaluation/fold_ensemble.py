"""Score-level ensembles of cross-validation rows, out of fold (issue 14).

Each ``lookalike train --cv K`` row leaves, per fold, its model's validation vectors and the
fold's candidate sets (``fold-K.npz``). Rows run on the same folds (same ``split_seed``) can
be ensembled without training again: a candidate's score is the mean of the rows' cosines
(the rows' embedding spaces are unrelated, so their *vectors* must not be averaged). The
table gives each row alone, the ensemble, and the paired differences on the same folds::

    python -m lookalike.evaluation.fold_ensemble data/train/cv/e30-lite01 \\
        data/train/cv/e30-lite01-seed1 data/train/cv/e30-lite01-seed2
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..core.scoring import set_cosines, set_metrics
from .crossval import mean_se

METRICS = ("top1", "top5", "mrr")


def _fold(row: Path, number: int) -> dict[str, np.ndarray]:
    with np.load(row / "model.work" / "cv" / f"fold-{number}.npz") as arrays:
        return {name: arrays[name] for name in ("vectors", "queries", "candidates", "answers")}


def ensemble(rows: Sequence[Path], folds: int = 5) -> dict[str, list[dict[str, float]]]:
    """Per fold, each row's metrics (keyed by the row's name) and the mean-cosine ensemble's."""
    found: dict[str, list[dict[str, float]]] = {str(row): [] for row in rows}
    found["ensemble"] = []
    for number in range(1, folds + 1):
        loaded = [_fold(row, number) for row in rows]
        first = loaded[0]
        for other, row in zip(loaded[1:], rows[1:], strict=True):
            if not (np.array_equal(other["queries"], first["queries"])
                    and np.array_equal(other["candidates"], first["candidates"])):
                raise SystemExit(f"{row}: fold {number} has other candidate sets than {rows[0]}")
        scores = [set_cosines(f["vectors"], f["queries"], f["candidates"]) for f in loaded]
        for row, row_scores in zip(rows, scores, strict=True):
            found[str(row)].append(set_metrics(row_scores, first["answers"]))
        found["ensemble"].append(set_metrics(np.mean(scores, axis=0), first["answers"]))
    return found


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rows", type=Path, nargs="+", help="CV rows' --out folders' parents "
                        "(data/train/cv/ROW, holding model.work/cv/fold-K.npz)")
    parser.add_argument("--folds", type=int, default=5)
    args = parser.parse_args(argv)
    found = ensemble(args.rows, args.folds)
    print("| row | " + " | ".join(METRICS) + " |\n|---|" + "---|" * len(METRICS))
    for name, folds in found.items():
        print(f"| {name} | " + " | ".join(
            "{:.3f} ± {:.3f}".format(*mean_se([f[m] for f in folds])) for m in METRICS) + " |")
    ens = found["ensemble"]
    singles = [found[str(row)] for row in args.rows]
    first = [e["top1"] - s["top1"] for e, s in zip(ens, singles[0], strict=True)]
    mean_single = [e["top1"] - np.mean([s[k]["top1"] for s in singles])
                   for k, e in enumerate(ens)]
    print("\npaired top-1, ensemble - first row: {:+.3f} ± {:.3f}".format(*mean_se(first))
          + f" {[round(x, 3) for x in first]}")
    print("paired top-1, ensemble - mean of the rows: {:+.3f} ± {:.3f}".format(
        *mean_se(mean_single)))


if __name__ == "__main__":
    main()
