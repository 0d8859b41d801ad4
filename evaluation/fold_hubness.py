"""The plain pair score's hubness correction, measured on the CV folds and shipped (issue 14).

A pair's cosine is high when either image is a *hub*, close to many images; one global
threshold then lets hubs match everyone. ``cosine - (hubness(a) + hubness(b)) / 2`` (CSLS,
Lample et al. 2018), each hubness the image's mean cosine to its ``k`` nearest images in a
cohort, puts every pair on the same footing. Each fold's cohort is its model's embeddings of
the images it trained on (:func:`~.fold_rerank.fold_cohort`), never the pairs it is scored on;
``k`` is chosen per fold on the other folds (AUC; ``k`` 0, no correction, competes), so every
figure is out of fold.

``--write-calibration MODEL_DIR`` ships it: the bundle's own embeddings of the training images
as its cohort (``cohort.safetensors``) and, in its ``calibration.json``, the entry
:data:`~lookalike.models.model.HUBNESS_KEY`: the ``k`` best over all folds and the threshold at
the target false-match rate on the pooled out-of-fold scores. ``POST /compare`` then judges
the corrected score. Needs a CV row run with ``--keep-fold-models``::

    python -m lookalike.evaluation.fold_hubness --config models/recipes/default.toml \\
        --cv-dir data/train/cv/default/model.work/cv --write-calibration models/default
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..models.train import TrainConfig, load_data
from . import fold_rerank as tools
from .fold_learned_regions import HUBNESS_KS, entry_cells, verification_entry

ENTRY_FIGURES = ("threshold", "target_far", "far", "tpr", "positives", "negatives", "auc",
                 "auc_se", "eer", "eer_se", "tmr_at_far", "tmr_at_far_se", "auc_gain",
                 "auc_gain_se")


def hubness_entry(cosines: dict[int, list[np.ndarray]], far: float = 0.01) -> dict[str, object]:
    """The calibration entry from each fold's :func:`~.fold_rerank.pair_matrix` cosines per
    ``k`` (0: uncorrected): ``k`` best by mean AUC over all folds, its threshold at ``far`` on
    the pooled out-of-fold scores, and the out-of-fold figures with ``k`` nested."""
    found = verification_entry({(k, 0.0): found for k, found in cosines.items()}, cosines[0],
                               far)
    return {"k": found["hubness_k"], **{name: found[name] for name in ENTRY_FIGURES},
            "nested_k": found["nested_hubness_k"]}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    tools.add_row_arguments(parser)
    parser.add_argument("--hubness-k", type=tools.comma_separated(int),
                        default=HUBNESS_KS, help="comma-separated cohort neighbours to choose "
                        "from (nested, on AUC); 0, no correction, is always among them")
    parser.add_argument("--far", type=float, default=0.01,
                        help="the false-match rate the threshold is fitted for")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--write-calibration", type=Path, metavar="MODEL_DIR",
                        help="ship it: write the bundle's cohort and the entry into this bundle "
                        "(the recipe's model), unless no correction wins")
    args = parser.parse_args(argv)
    config = tools.row_recipe(args)
    print(f"machine: {tools.machine()}", flush=True)
    started = time.perf_counter()
    data = load_data(config)
    features = tools.cached_features(config, data.images)
    folds = tools.load_folds(args.cv_dir, data.images)
    if any(f.head is None for f in folds):
        raise SystemExit(f"{args.cv_dir}: fold heads missing; re-run the row with "
                         "--keep-fold-models")
    cosines: dict[int, list[np.ndarray]] = {k: [] for k in sorted({0, *args.hubness_k})}
    for fold in folds:
        cohort, plain = tools.fold_cohort(fold, features), tools.pair_matrix(fold, fold.vectors)
        for k, found in cosines.items():
            found.append(tools.corrected_pairs(fold, plain, cohort, k))
    base = [tools.figures(c) for c in cosines[0]]
    print("\n| pair score | AUC | EER | TMR @ 1% FMR | paired AUC |\n|---|---|---|---|---|")
    report: dict[str, object] = {"machine": tools.machine(), "settings": {
        "config": str(args.config), "cv_dir": str(args.cv_dir), "hubness_k": list(cosines)}}
    for k, cos in cosines.items():
        rows = [tools.figures(c) for c in cos]
        label = f"cosine - hubness (k={k})" if k else "cosine"
        figures = " | ".join(tools.cell([m[name] for m in rows])
                             for name in ("auc", "eer", "tmr_at_far"))
        gain = tools.signed([m["auc"] - b["auc"] for m, b in zip(rows, base, strict=True)])
        print(f"| {label} | {figures} | {gain} |")
        report[label] = rows
    entry = hubness_entry(cosines, args.far)
    print(f"| k nested per fold: {entry['nested_k']} | {entry_cells(entry)} |\n\nchosen over "
          f"all folds: k = {entry['k']}, threshold {entry['threshold']:.4f} at FMR {args.far}")
    report["entry"] = entry
    if args.write_calibration:
        if not entry["k"]:
            print("no correction wins out of fold: nothing written")
        else:
            written = ship(args.write_calibration, features, config, args.config, len(folds),
                           entry)
            print(f"written: {', '.join(map(str, written))}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    print(f"\ndone in {time.perf_counter() - started:.0f} s; {tools.machine()}")


def ship(model_dir: Path, features: np.ndarray, config: TrainConfig, recipe: Path, folds: int,
         entry: dict[str, object]) -> list[Path]:
    """Write the bundle's cohort and its :data:`~lookalike.models.model.HUBNESS_KEY` entry,
    both naming its fingerprint. A cohort already there for these weights is the same
    embeddings (:func:`~.fold_rerank.bundle_cohort`) and may carry the re-ranker's regions
    (:mod:`.fold_learned_regions`), so it is kept."""
    from ..models.cohort import Cohort
    from ..models.errors import BundleError
    from ..models.model import HUBNESS_KEY, update_calibration
    from ..models.resolve import default_cache_dir, resolve_model

    model = resolve_model(str(model_dir), default_cache_dir())
    cohort = tools.bundle_cohort(model_dir, features, config, recipe)
    measured_on = {"method": f"out-of-fold scores of {folds}-fold cross-validation",
                   "machine": tools.machine(), **cohort.facts}
    try:
        Cohort.load(Path(model_dir), model.fingerprint, cohort.vectors.shape[1])
        written = []
    except BundleError:
        written = [cohort.save(model_dir, model.fingerprint)]
    return [*written, update_calibration(model_dir, model.fingerprint,
                                         {HUBNESS_KEY: {**entry, "measured_on": measured_on}})]


if __name__ == "__main__":
    main()
