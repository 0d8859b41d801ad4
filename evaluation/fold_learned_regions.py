"""Trained region late interaction, measured on the cross-validation folds, and shipped (issue 14).

:mod:`.fold_rerank` scores candidates by MaxSim over region vectors that were never trained
for it (untrained trunk channels, or the global head's per-location terms). Here the regions
are *learned* (:mod:`~lookalike.models.regions_net`): each image's 49 locations (stages 4-7
of the recipe's frozen trunks pooled to 7 x 7, standardised) go through one linear map ``W``
to ``dim`` values and unit length, and ``W`` is trained on the fold's *training* pairs with a
symmetric InfoNCE over the in-batch MaxSim scores (query -> candidate), and with it (the
default ``--pooling weighted``) the importance that weighs the query's regions in MaxSim
instead of their plain mean (``--pooling mean``, the sixth to eleventh sessions' setting).
The fold's held-out sets are then scored by ``cosine + lam * learned MaxSim`` with the fold
model's cosine, ``lam`` chosen per fold on the other folds (nested), so every figure is out
of fold; verification pairs too (``lam`` nested on AUC). The served pair score takes MaxSim
both ways and subtracts half of each image's hubness *of that score* against the fold's
:func:`region_cohort` (its training images' regions, as stored), ``k`` nested with ``lam``.

``--write-rerank MODEL_DIR`` then ships it: ``W`` trained the same way on *all* pairs goes
into the bundle (``regions.safetensors``) and the weight best over all folds, with the
out-of-fold figures, into its ``calibration.json``; ``lookalike rank --rerank`` and ``POST
/rank`` with ``rerank: true`` use them.

Needs a CV row run with ``--keep-fold-models`` and the region cache of :mod:`.fold_rerank`::

    python -m lookalike.evaluation.fold_learned_regions --config models/recipes/accurate.toml \\
        --cv-dir data/train/cv/e30-lite01/model.work/cv --write-rerank models/accurate
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..core.scoring import set_metrics
from ..models.cohort import Cohort, CohortRegions
from ..models.network import stage_channels
from ..models.regions_net import (
    LOCATIONS,
    MAP_DIM,
    MAP_EPOCHS,
    MAP_TEMPERATURE,
    REGION_STAGES,
    RegionMap,
    TrainedMap,
    location_tokens,
    region_weights,
    standardisation,
    train_region_map,
)
from ..models.rerank import PAIR_SCORE, REGIONS, cohort_scores, combined_hubness
from ..models.train import TrainConfig, load_data
from .crossval import mean_se
from .fold_rerank import (
    LAMBDAS,
    Fold,
    add_row_arguments,
    bundle_cohort,
    cached_features,
    cell,
    comma_separated,
    corrected_pairs,
    figures,
    fold_cohort,
    load_folds,
    machine,
    nested,
    nested_verification,
    pair_matrix,
    pick_nested,
    region_cache,
    row_recipe,
    set_table,
    signed,
    stage_maps,
    tta_vectors,
)
from .verification import matrix_pairs, threshold_at_far

WEIGHTS = (*LAMBDAS, 4.0, 6.0, 10.0)
"""Weights of the learned MaxSim to choose from: wider than the untrained regions' grid,
whose top (3.0) the learned MaxSim reached in some folds."""
HUBNESS_KS = (0, 5, 10, 20, 50)
"""Cohort neighbours of the pair score's hubness correction to choose from (0: none)."""
REGION_COHORT_IMAGES = 800
"""Cohort images whose regions the re-ranked pair score's hubness is measured against: those
most often among other images' best-scoring (in cross-validation 800 such images of 2,400
gave all 2,400's ROC-AUC, 400 lost 0.002, and 400 drawn at random 0.002-0.003)."""
PROBES, SELECTION_K, SELECTION_WEIGHT = 600, 50, 4.0
"""How the region cohort is chosen: each of ``PROBES`` cohort images (drawn) votes for its
``SELECTION_K`` best-scoring others, by cosine + ``SELECTION_WEIGHT`` x symmetric MaxSim."""


def multiscale(tokens: torch.Tensor, scales: Sequence[int]) -> torch.Tensor:
    """``(N, L*L, C)`` location tokens -> ``(N, sum s*s, C)``: the grid average-pooled to each
    of ``scales`` cells per side (``L`` among them keeps the tokens). The map is linear, so a
    pooled token's region is the map of the pooled locations: a coarse region costs no pass."""
    side = int(round(tokens.shape[1] ** 0.5))
    grid = tokens.transpose(1, 2).unflatten(2, (side, side))
    return torch.cat([F.adaptive_avg_pool2d(grid, s).flatten(2) for s in scales],
                     dim=2).transpose(1, 2).contiguous()


def project(weight: torch.Tensor, tokens: torch.Tensor) -> np.ndarray:
    """``(N, L, C)`` tokens -> ``(N, L, dim)`` unit learned regions."""
    with torch.no_grad():
        return F.normalize(tokens @ weight.T, dim=-1).numpy()


def query_weights(trained: TrainedMap, tokens: torch.Tensor) -> np.ndarray | None:
    """``(N, L, C)`` tokens -> ``(N, L)`` query-region weights of a weighted map, else None."""
    if trained.importance is None:
        return None
    with torch.no_grad():
        return region_weights(tokens, trained.importance).double().numpy()


def pair_weights(trained: TrainedMap, tokens: torch.Tensor) -> np.ndarray:
    """:func:`query_weights`, uniform for a plain map (as the served pair score's)."""
    found = query_weights(trained, tokens)
    return np.full(tokens.shape[:2], 1.0 / tokens.shape[1]) if found is None else found


def region_cohort(vectors: np.ndarray, regions: np.ndarray, weights: np.ndarray,
                  count: int = REGION_COHORT_IMAGES, seed: int = 0) -> CohortRegions:
    """The regions (``(N, L, d)``, weights ``(N, L)``) of the ``count`` of ``N`` cohort images
    (unit ``vectors``) that are most often among the best-scoring of the others (drawn
    probes'): a hubness is the mean of an image's best scores, so these are the images it is
    made of, and a third of the cohort gives the whole cohort's correction."""
    everyone = Cohort(vectors, regions=CohortRegions(np.arange(len(vectors)), regions, weights))
    probes = np.random.default_rng(seed).choice(len(vectors), min(PROBES, len(vectors)),
                                                replace=False)
    cosines, lates = cohort_scores(vectors[probes], regions[probes], weights[probes], everyone)
    scores = cosines + SELECTION_WEIGHT * lates
    scores[np.arange(len(probes)), probes] = -np.inf
    k = min(SELECTION_K, len(vectors) - 1)
    best = np.argpartition(scores, scores.shape[1] - k, axis=1)[:, -k:]
    votes = np.bincount(best.ravel(), minlength=len(vectors))
    rows = np.sort(np.argsort(-votes, kind="stable")[:count])
    return CohortRegions(rows, regions[rows], weights[rows])


def combined_pairs(pair_cosines: np.ndarray, pair_lates: np.ndarray, fold: Fold,
                   held_out: tuple[np.ndarray, np.ndarray], weight: float, k: int
                   ) -> np.ndarray:
    """A fold's re-ranked pair scores as served: ``(N, N)`` cosines + ``weight`` x symmetric
    MaxSims, minus half of each side's :func:`~lookalike.models.rerank.combined_hubness` from
    the validation images' ``held_out`` :func:`~lookalike.models.rerank.cohort_scores` (``k``
    0: uncorrected)."""
    scores = pair_cosines + weight * pair_lates
    if not k:
        return scores
    return fold.minus_hubness(scores, combined_hubness(*held_out, weight, k))


def fold_training_pairs(pairs: np.ndarray, fold: Fold) -> np.ndarray:
    """The pairs (rows of the image list) a fold's model trained on: those sharing no image
    with the fold's validation images."""
    held_out = np.isin(pairs, fold.rows).any(axis=1)
    return pairs[~held_out]


def mirrored_pairs(pairs: np.ndarray, images: int) -> np.ndarray:
    """``pairs`` (rows of ``images`` tokens), then each pair's mirror image: both images
    flipped, whose tokens follow the originals (image ``i``'s mirror is row ``images + i``).
    A look-alike stays one when both pictures are mirrored, so this doubles the pairs."""
    return np.concatenate([pairs, pairs + images])


def rerank_entry(cosines: list[np.ndarray], lates: list[np.ndarray], answers: list[np.ndarray],
                 base: list[dict[str, float]], lambdas: Sequence[float] = WEIGHTS
                 ) -> dict[str, object]:
    """The shipped re-ranker's calibration entry: the weight best by mean top-1 over every
    fold (as a threshold is fitted on all out-of-fold scores), and the out-of-fold figures with
    the weight chosen per fold on the others (what predicts unseen pairs)."""
    table = set_table(cosines, lates, answers, lambdas)
    chosen, found = pick_nested(table, lambdas, "top1")
    top1 = np.array([[t["top1"] for t in row] for row in table])
    entry: dict[str, object] = {
        "weight": lambdas[int(np.argmax(top1.mean(axis=0)))], "regions": REGIONS,
        "direction": "query -> candidate", "nested_weights": chosen}
    for metric in ("top1", "top5", "mrr"):
        entry[metric], entry[f"{metric}_se"] = mean_se([m[metric] for m in found])
    entry["top1_gain"], entry["top1_gain_se"] = mean_se(
        [m["top1"] - b["top1"] for m, b in zip(found, base, strict=True)])
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()}


def verification_entry(scores: dict[tuple[int, float], list[np.ndarray]],
                       plain: list[np.ndarray], far: float = 0.01) -> dict[str, object]:
    """A pair score's calibration from each fold's ``(N, N)`` pair ``scores`` per option
    ``(hubness k, weight)`` (``plain``: each fold's uncorrected cosines, the baseline): the
    option best by mean AUC over every fold, the threshold at ``far`` on the pooled
    out-of-fold non-matching scores with it (as ``calibration.json``'s cosine threshold is
    fitted), and the out-of-fold figures with the option chosen per fold on the others."""
    options = list(scores)
    table = [[figures(scores[option][fold]) for option in options]
             for fold in range(len(plain))]
    chosen, found = pick_nested(table, options, "auc")
    auc = np.array([[t["auc"] for t in row] for row in table])
    hubness_k, weight = options[int(np.argmax(auc.mean(axis=0)))]
    split = [matrix_pairs(m) for m in scores[hubness_k, weight]]
    positive = np.concatenate([p for p, _ in split])
    negative = np.concatenate([n for _, n in split])
    threshold = threshold_at_far(negative, far)
    baseline = [figures(c) for c in plain]
    entry: dict[str, object] = {
        "weight": weight, "hubness_k": hubness_k, "threshold": threshold, "target_far": far,
        "far": float((negative >= threshold).mean()), "tpr": float((positive >= threshold).mean()),
        "positives": len(positive), "negatives": len(negative),
        "nested_weights": [lam for _, lam in chosen],
        "nested_hubness_k": [k for k, _ in chosen]}
    for metric in ("auc", "eer", "tmr_at_far"):
        entry[metric], entry[f"{metric}_se"] = mean_se([m[metric] for m in found])
    entry["fold_auc"] = [round(m["auc"], 4) for m in found]  # to pair runs fold by fold
    entry["auc_gain"], entry["auc_gain_se"] = mean_se(
        [m["auc"] - b["auc"] for m, b in zip(found, baseline, strict=True)])
    return {k: round(v, 4) if isinstance(v, float) and k != "threshold" else v
            for k, v in entry.items()}


def entry_cells(entry: dict[str, object]) -> str:
    """A verification entry's out-of-fold AUC, EER, TMR and paired AUC gain as table cells."""
    return " | ".join(f"{entry[name]:{'+' if name == 'auc_gain' else ''}.3f} ± "
                      f"{entry[name + '_se']:.3f}"
                      for name in ("auc", "eer", "tmr_at_far", "auc_gain"))


def ship(model_dir: Path, trained: TrainedMap, region_map: RegionMap, tokens: torch.Tensor,
         features: np.ndarray, config: TrainConfig, recipe: Path, entry: dict[str, object]
         ) -> list[Path]:
    """Write the region map and the cohort (the bundle's embeddings of the training images'
    cached ``features``, as each fold's cohort was made, and the :func:`region_cohort` of the
    map's regions of their ``tokens``) beside the bundle, and merge ``entry`` into its
    ``calibration.json`` under ``rerank``: all name its fingerprint."""
    from ..models.model import RERANK_KEY, update_calibration
    from ..models.resolve import default_cache_dir, resolve_model

    model = resolve_model(str(model_dir), default_cache_dir())
    cohort = bundle_cohort(model_dir, features, config, recipe)
    found = region_cohort(cohort.vectors, project(trained.weight, tokens),
                          pair_weights(trained, tokens))
    cohort = dataclasses.replace(cohort, regions=found,
                                 facts=cohort.facts | {"region_images": len(found.rows)})
    return [region_map.save(model_dir, model.fingerprint),
            cohort.save(model_dir, model.fingerprint),
            update_calibration(model_dir, model.fingerprint, {RERANK_KEY: entry})]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_row_arguments(parser)
    parser.add_argument("--region-cache", type=Path, default=Path("data/train/region-cache"))
    parser.add_argument("--dim", type=int, default=MAP_DIM, help="learned region width")
    parser.add_argument("--epochs", type=int, default=MAP_EPOCHS)
    parser.add_argument("--temperature", type=float, default=MAP_TEMPERATURE,
                        help="of the map's InfoNCE (0.03 since the fourteenth session: 0.05 "
                        "gave 0.002-0.003 less AUC and 0.009 less top-1 over two seeds)")
    parser.add_argument("--pooling", choices=("weighted", "mean"), default="weighted",
                        help="how MaxSim pools the query's regions: weights learned with the "
                        "map (shipped since the twelfth session) or their plain mean")
    parser.add_argument("--importance-lr", type=float, default=1e-2,
                        help="learning rate of the region importance (--pooling weighted)")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--batch-size", type=int, default=128,
                        help="pairs per training batch: each pair's negatives are the batch's "
                        "other pairs")
    parser.add_argument("--lambdas", type=comma_separated(float),
                        default=WEIGHTS, help="comma-separated weights of the learned MaxSim "
                        "to choose from (nested)")
    parser.add_argument("--symmetric", action="store_true",
                        help="score candidate sets by MaxSim both ways (query -> candidate and "
                        "back, averaged) instead of query -> candidate")
    parser.add_argument("--maps", type=int, default=1,
                        help="an ensemble: train this many maps per fold (seeds 100 apart) and "
                        "average their MaxSims (measurement only)")
    parser.add_argument("--seed", type=int, default=0,
                        help="added to each fold's seed for the map's init and batches (the "
                        "all-pairs map uses it alone): to see how far seeds move the figures")
    parser.add_argument("--stages", type=comma_separated(int),
                        default=REGION_STAGES, help="comma-separated trunk stages whose maps "
                        "make the region tokens (each stage weighted alike), e.g. 3,4,5,6,7 "
                        "adds the 28 x 28 stage pooled to 7 x 7 (a new region cache)")
    parser.add_argument("--scales", type=comma_separated(int),
                        default=(LOCATIONS,), help="comma-separated grids (cells per side) of "
                        "the region tokens, e.g. 7,3,1 adds a 3 x 3 and a whole-image region "
                        "to the 7 x 7 ones (measurement only)")
    parser.add_argument("--mirrored-pairs", action="store_true",
                        help="train the map on each pair's mirror image too (both images "
                        "flipped, one more pass over the images, cached): twice the training "
                        "pairs at no serving cost")
    parser.add_argument("--mirror-candidates", action="store_true",
                        help="match each query region against the candidate's regions and its "
                        "mirror's (measurement only: a second pass per candidate)")
    parser.add_argument("--hubness-k", type=comma_separated(int),
                        default=HUBNESS_KS, help="comma-separated cohort neighbours of the pair "
                        "score's hubness correction to choose from (0: none; nested with the "
                        "weight, on AUC); each fold's cohort is the images it trained on")
    parser.add_argument("--json", type=Path, help="write the per-fold figures here")
    parser.add_argument("--write-rerank", type=Path, metavar="MODEL_DIR",
                        help="ship it: train the map on all pairs into this bundle (the recipe's "
                        "model) and write the weight best over all folds, with the out-of-fold "
                        "figures, into its calibration.json")
    args = parser.parse_args(argv)
    if args.write_rerank and (args.symmetric or args.maps != 1 or args.scales != (LOCATIONS,)
                              or args.mirror_candidates):
        parser.error("--write-rerank ships one map, query -> candidate, on the 7 x 7 grid: "
                     "drop --symmetric, --maps, --scales and --mirror-candidates")
    weighted = args.pooling == "weighted"
    config = row_recipe(args)
    print(f"machine: {machine()}", flush=True)
    started = time.perf_counter()
    data = load_data(config)
    rows = {str(p): i for i, p in enumerate(data.images)}
    features = cached_features(config, data.images)

    def cached_stages(flip: bool = False) -> tuple[dict[str, torch.Tensor], list[np.ndarray]]:
        """The region cache (of the mirrored images: ``flip``) and its maps per stage."""
        cache = region_cache(config, data.images, args.region_cache, flip=flip,
                             stages=args.stages)
        maps = {k: v.float().numpy() for k, v in cache.items() if k != "mirror"}
        return cache, stage_maps(maps, len(config.backbones), args.stages)

    cache, per_stage = cached_stages()
    mirror = cache["mirror"].float().numpy().astype(np.float64)[:, :features.shape[1]]
    mean, scale = standardisation(per_stage)
    tokens = multiscale(torch.from_numpy(location_tokens(per_stage, mean, scale)), args.scales)
    mirrored = None
    if args.mirrored_pairs or args.mirror_candidates:
        _, flipped_stages = cached_stages(flip=True)
        mirrored = multiscale(torch.from_numpy(location_tokens(flipped_stages, mean, scale)),
                              args.scales)
    train_tokens = torch.cat([tokens, mirrored]) if args.mirrored_pairs else tokens
    pairs = np.array([(rows[str(data.first_paths[a])], rows[str(data.second_paths[b])])
                      for (a, b), label in zip(data.pairs, data.targets, strict=True) if label])
    folds = load_folds(args.cv_dir, data.images)
    if any(f.head is None for f in folds):
        raise SystemExit(f"{args.cv_dir}: fold heads missing; re-run the row with "
                         "--keep-fold-models")
    cosines: dict[str, list[np.ndarray]] = {"plain": [], "flip TTA": []}
    pair_cosines: dict[str, list[np.ndarray]] = {"plain": [], "flip TTA": []}
    corrected: dict[int, list[np.ndarray]] = {k: [] for k in (0, *args.hubness_k)}
    lates, pair_lates, answers = [], [], []
    symmetric_lates, held_out_scores = [], []
    for fold in folds:
        cohort = fold_cohort(fold, features)
        training = fold_training_pairs(pairs, fold)
        if args.mirrored_pairs:
            training = mirrored_pairs(training, len(tokens))
        trained = [train_region_map(train_tokens, training, args.dim, args.epochs,
                                    args.temperature, args.weight_decay,
                                    batch_size=args.batch_size,
                                    seed=fold.number + args.seed + 100 * k, weighted=weighted,
                                    importance_lr=args.importance_lr)
                   for k in range(args.maps)]
        held_out = torch.from_numpy(fold.rows)
        regions = [project(m.weight, tokens[held_out]) for m in trained]
        qweights = [query_weights(m, tokens[held_out]) for m in trained]
        targets = ([np.concatenate([r, project(m.weight, mirrored[held_out])], axis=1)
                    for r, m in zip(regions, trained, strict=True)]
                   if args.mirror_candidates else [None] * len(trained))
        tta = tta_vectors(fold, features, mirror)
        for name, vectors in (("plain", fold.vectors), ("flip TTA", tta)):
            cosines[name].append(fold.cosines(vectors))
            pair_cosines[name].append(pair_matrix(fold, vectors))
        for k, found in corrected.items():
            found.append(corrected_pairs(fold, pair_cosines["plain"][-1], cohort, k))
        lates.append(np.mean([fold.late(r, args.symmetric, t, w)
                              for r, t, w in zip(regions, targets, qweights, strict=True)],
                             axis=0))
        pair_lates.append(np.mean([pair_matrix(fold, None, r, t, w)
                                   for r, t, w in zip(regions, targets, qweights, strict=True)],
                                  axis=0))
        answers.append(fold.answers)
        # the pair score as served: the first map's MaxSims both ways, hubness of that score
        first, first_weights = regions[0], pair_weights(trained[0], tokens[held_out])
        symmetric_lates.append(pair_matrix(fold, None, first, weights=first_weights,
                                           symmetric=True))
        others = torch.from_numpy(np.delete(np.arange(len(tokens)), fold.rows))
        found = region_cohort(cohort, project(trained[0].weight, tokens[others]),
                              pair_weights(trained[0], tokens[others]), seed=fold.number)
        held_out_scores.append(cohort_scores(fold.vectors, first, first_weights,
                                             Cohort(cohort, regions=found.stored())))
        print(f"fold {fold.number}: learned MaxSim alone top-1 "
              f"{set_metrics(lates[-1], fold.answers)['top1']:.3f} "
              f"({time.perf_counter() - started:.0f} s)", flush=True)

    report: dict[str, object] = {"machine": machine(), "settings": vars(args) | {
        "config": str(args.config), "cv_dir": str(args.cv_dir), "json": None,
        "region_cache": str(args.region_cache),
        "write_rerank": str(args.write_rerank) if args.write_rerank else None}}
    base = [set_metrics(c, a) for c, a in zip(cosines["plain"], answers, strict=True)]
    alone = [set_metrics(li, a) for li, a in zip(lates, answers, strict=True)]
    ensemble = f" x {args.maps} maps (MaxSims averaged)" if args.maps > 1 else ""
    variant = (", mirrored pairs" if args.mirrored_pairs else "") + (
        ", candidates' mirrors" if args.mirror_candidates else "")
    print(f"\nlearned regions {args.dim}-d{ensemble}{variant}, {args.pooling} query regions, "
          f"{args.epochs} epochs, temperature "
          f"{args.temperature}, weight decay {args.weight_decay}, batch {args.batch_size}\n\n"
          "| scoring | lam per fold "
          "| top-1 | top-5 | MRR | paired top-1 |\n|---|---|---|---|---|---|")
    print(f"| fold model (plain cosine) | | {cell([m['top1'] for m in base])} | "
          f"{cell([m['top5'] for m in base])} | {cell([m['mrr'] for m in base])} | |")
    print(f"| learned MaxSim alone | | {cell([m['top1'] for m in alone])} | "
          f"{cell([m['top5'] for m in alone])} | {cell([m['mrr'] for m in alone])} | |")
    for name, cos in cosines.items():
        chosen, found = nested(cos, lates, answers, args.lambdas)
        gain = [m["top1"] - b["top1"] for m, b in zip(found, base, strict=True)]
        print(f"| {name} cosine + lam x learned MaxSim | {chosen} | "
              f"{cell([m['top1'] for m in found])} | {cell([m['top5'] for m in found])} | "
              f"{cell([m['mrr'] for m in found])} | {signed(gain)} "
              f"{[round(g, 3) for g in gain]} |")
        report[f"sets/{name}"] = {"lam": chosen, "metrics": found}

    plain = [figures(c) for c in pair_cosines["plain"]]
    print("\n| verification score | lam per fold | AUC | EER | TMR @ 1% FMR | paired AUC |\n"
          "|---|---|---|---|---|---|")
    scores = {f"{name} cosine": cos for name, cos in pair_cosines.items()}
    scores |= {f"plain cosine - hubness (k={k})": cos for k, cos in corrected.items() if k}
    for name, cos in scores.items():
        lams, nested_found = nested_verification(cos, pair_lates, args.lambdas)
        for label, found, chosen in (
                (name, [figures(c) for c in cos], ""),
                (f"{name} + lam x learned MaxSim", nested_found, lams)):
            gain = signed([m["auc"] - b["auc"] for m, b in zip(found, plain, strict=True)])
            print(f"| {label} | {chosen} | {cell([m['auc'] for m in found])} | "
                  f"{cell([m['eer'] for m in found])} | {cell([m['tmr_at_far'] for m in found])}"
                  f" | {gain} |")
            report[f"verification/{label}"] = {"lam": chosen, "metrics": found}
    combined = {(k, lam): [combined_pairs(c, li, fold, held, lam, k) for c, li, fold, held in
                           zip(pair_cosines["plain"], symmetric_lates, folds, held_out_scores,
                               strict=True)]
                for k in (0, *args.hubness_k) for lam in args.lambdas}
    verification = verification_entry(combined, pair_cosines["plain"])
    verification["pair_score"] = PAIR_SCORE
    picks = list(zip(verification["nested_hubness_k"], verification["nested_weights"],
                     strict=True))
    print(f"| plain cosine + lam x learned MaxSim both ways - hubness of that score "
          f"({REGION_COHORT_IMAGES} cohort images' regions), k and lam nested (shipped) | "
          f"{picks} | {entry_cells(verification)} |")
    report["verification/shipped"] = verification
    if args.write_rerank:
        training = mirrored_pairs(pairs, len(tokens)) if args.mirrored_pairs else pairs
        final = train_region_map(train_tokens, training, args.dim, args.epochs,
                                 args.temperature, args.weight_decay,
                                 batch_size=args.batch_size, seed=args.seed, weighted=weighted,
                                 importance_lr=args.importance_lr)
        stages = tuple((b, s, stage_channels(name)[s]) for b, name in enumerate(config.backbones)
                       for s in args.stages)
        facts = {"dim": args.dim, "epochs": args.epochs, "temperature": args.temperature,
                 "weight_decay": args.weight_decay, "batch_size": args.batch_size,
                 "pairs": len(pairs), "images": len(data.images), "recipe": str(args.config),
                 "mirrored_pairs": args.mirrored_pairs, "pooling": args.pooling}
        if weighted:
            facts["importance_lr"] = args.importance_lr
        region_map = RegionMap(final.weight.numpy(), mean, scale, stages, LOCATIONS, facts,
                               None if final.importance is None else final.importance.numpy())
        entry = rerank_entry(cosines["plain"], lates, answers, base, args.lambdas)
        entry["verification"] = verification
        entry["measured_on"] = {"cv_dir": str(args.cv_dir), "folds": len(folds),
                                "pairs_file": str(config.pairs), "machine": machine(), **facts}
        written = ship(args.write_rerank, final, region_map, tokens, features, config,
                       args.config, entry)
        print(f"\nre-ranker written: {', '.join(map(str, written))}: {entry}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))
    print(f"\ndone in {time.perf_counter() - started:.0f} s; {machine()}")


if __name__ == "__main__":
    main()
