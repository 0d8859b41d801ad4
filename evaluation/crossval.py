"""K-fold cross-validation of a training recipe: figures that predict pairs never seen.

One 300-set validation split gave an optimistic figure (the recipe had been chosen on it,
and one standard error there is ~0.03). Here the positive pairs are shuffled once (seeded)
and cut into K folds (:func:`~lookalike.core.pairs.fold_pairs`); fold k's model trains on
the pairs of the other folds and is scored on fold k's pairs only, as 20-candidate sets made
the challenge's way (seeded) and as verification pairs. Each fold's model is the one at its
*last* epoch (a fixed count from the recipe, no early stopping), so no figure comes from an
epoch chosen on the fold it reports. The recipe's figure is the mean over the folds with its
standard error (standard deviation over folds / sqrt(K)).

A frozen trunk's features of every image are computed once and shared by all folds (the
:class:`~lookalike.models.feature_cache.FeatureCache` of the whole data), so a recipe's CV
costs a few minutes of head training. Each finished fold is saved as ``fold-K.json`` with
its out-of-fold verification scores and validation vectors with their candidate sets
(``fold-K.npz``, for re-rankers measured on the same folds), and with ``keep_fold_models`` the
fold model's trained part (``fold-K.head.safetensors``: standardisation and head, all a frozen
trunk's model adds); a rerun with the same settings skips it, so an interrupted CV resumes at the
fold it stopped in.

Then the recipe's model is trained on all the pairs for the same epochs (what ships: the
CV figures describe it, and are recorded in its bundle), and its ``calibration.json`` is
fitted on the out-of-fold verification scores: every pair scored by a model that never saw it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from ..core.files import atomic_write
from ..models.curves import plot_history
from ..models.device import hardware
from ..models.train_config import TrainConfig
from .errors import EvaluationError
from .verification import pair_scores, threshold_at_far, verification_metrics

__all__ = ["CV_METRICS", "CrossValidation", "cross_validate", "fold_metrics", "head_path",
           "markdown_row", "mean_se", "pair_figures", "save_head"]

CV_METRICS = ("top1", "top5", "mrr", "auc", "eer", "tmr_at_far")
"""What each fold reports: candidate-set top-1/top-5/MRR (cosine, no assignment), and
verification ROC-AUC, equal error rate and true-match rate at the target false-match rate."""

TARGET_FAR = 0.01


@dataclass
class CrossValidation:
    """The K folds' figures and their summary (mean and standard error per metric)."""

    folds: list[dict[str, Any]]
    summary: dict[str, dict[str, float]]
    curve: list[float]
    """Mean validation top-1 over the folds after each epoch (index 0: before training)."""
    directory: Path
    bundle: Path
    """The recipe's model, trained on every pair."""
    positives: np.ndarray
    """Out-of-fold matching-pair cosines, every pair once (each scored by the fold model
    that never trained on it); with :attr:`negatives`, what a calibration is fitted on."""
    negatives: np.ndarray

    def to_dict(self, config: TrainConfig) -> dict[str, Any]:
        best = int(np.argmax(self.curve))
        return {
            "recipe": config.to_dict(),
            "folds": len(self.folds),
            "summary": self.summary,
            "per_fold": [{k: f[k] for k in ("fold", *CV_METRICS, "n", "minutes")}
                         for f in self.folds],
            "mean_top1_by_epoch": self.curve,
            "peak_epoch": {"epoch": best, "mean_top1": self.curve[best]},
            "target_far": TARGET_FAR,
            "hardware": hardware(),
        }


def fold_metrics(
    vectors: np.ndarray, queries: np.ndarray, candidates: np.ndarray, answers: np.ndarray,
    candidate_scores: dict[str, float],
) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
    """One fold's figures from the unit vectors of its validation images: the candidate-set
    metrics given, plus verification over the fold's pairs (positives: each query with its
    true match; negatives: each query with every other pair's match). Returns (metrics,
    positive cosines, negative cosines)."""
    truth = candidates[np.arange(len(answers)), answers]
    positive, negative = pair_scores(vectors[queries], vectors[truth])
    metrics = {**{k: candidate_scores[k] for k in ("top1", "top5", "mrr", "n")},
               **pair_figures(positive, negative)}
    return metrics, positive, negative


def pair_figures(positive: np.ndarray, negative: np.ndarray) -> dict[str, float]:
    """The verification figures a fold reports: ROC-AUC, equal error rate, and the true-match
    rate at the threshold that lets through :data:`TARGET_FAR` of the non-matching pairs."""
    verification = verification_metrics(positive, negative)
    threshold = threshold_at_far(negative, TARGET_FAR)
    return {"auc": verification["auc"], "eer": verification["eer"],
            "tmr_at_far": float((positive >= threshold).mean())}


def _mean_history(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The folds' validation curves averaged epoch by epoch (what the bundle's training
    curve shows: a cross-validated model has no validation of its own)."""
    length = min(len(r["history"]) for r in records)
    mean = []
    for epoch in range(length):
        entries = [r["history"][epoch] for r in records]
        losses = [e["loss"] for e in entries if e["loss"] is not None]
        mean.append({"epoch": epoch, "loss": float(np.mean(losses)) if losses else None,
                     **{k: float(np.mean([e[k] for e in entries]))
                        for k in ("top1", "top5", "mrr")}})
    return mean


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean over folds and its standard error (standard deviation / sqrt(K); NaN for one)."""
    array = np.asarray(values, dtype=np.float64)
    se = float(array.std(ddof=1) / math.sqrt(len(array))) if len(array) > 1 else math.nan
    return float(array.mean()), se


def _summary(folds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    summary = {}
    for key in CV_METRICS:
        mean, se = mean_se([fold[key] for fold in folds])
        summary[key] = {"mean": mean, "se": se}
    return summary


def _fold_config(config: TrainConfig, directory: Path, fold: int) -> TrainConfig:
    """The recipe for one fold: its own work folder, the shared feature cache, no bars per
    epoch but the fold's own."""
    work = directory / f"fold-{fold + 1}"
    return dataclasses.replace(config, out=work / "model", work_dir=work,
                               feature_cache=config.feature_cache, resume=False)


def _run_fold(config: TrainConfig, fold: int, folds: int, head: Path | None = None,
              ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    from ..models.train import Trainer

    started = time.perf_counter()
    trainer = Trainer(config, fold=(fold, folds))
    trainer.train_epochs()
    val = trainer.val
    vectors = trainer.embed(val.images, trainer.val_features)
    scores = trainer.evaluator(vectors)
    metrics, positive, negative = fold_metrics(vectors, val.queries, val.candidates,
                                               val.answers, scores)
    if head is not None:
        save_head(trainer.net, head)
    history = [{k: entry[k] for k in ("epoch", "loss", "top1", "top5", "mrr")}
               for entry in trainer.state["history"]]
    record = {"fold": fold + 1, **metrics, "history": history,
              "train_pairs": len(trainer.train_pairs.first),
              "images": [str(path) for path in val.images],
              "minutes": round((time.perf_counter() - started) / 60, 2)}
    arrays = {"positive": positive, "negative": negative, "vectors": vectors,
              "queries": val.queries, "candidates": val.candidates, "answers": val.answers}
    return record, arrays


def head_path(directory: Path, fold: int) -> Path:
    """Where fold ``fold`` (1-based) keeps its model's trained part (``keep_fold_models``)."""
    return directory / f"fold-{fold}.head.safetensors"


def save_head(net: Any, path: Path) -> None:
    """Save an :class:`~lookalike.models.network.EmbeddingNet`'s tensors outside its trunks
    (standardisation buffers, head weights): with the frozen trunks' offline weights, the
    whole fold model. Load with ``net.load_state_dict(load_file(path), strict=False)``."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in net.state_dict().items()
             if not k.startswith("trunks.")}
    atomic_write(path, lambda tmp: save_file(state, str(tmp)))


def _save_arrays(path: Path, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as handle:  # a handle: np.savez would add ".npz" to a name
            np.savez(handle, **arrays)

    atomic_write(path, write)


def _train_final(config: TrainConfig, facts: dict[str, Any], positives: np.ndarray,
                 negatives: np.ndarray) -> Path:
    """Train the recipe on every pair; record the CV figures in the bundle and fit its
    calibration on the out-of-fold scores."""
    from ..models.bundle import load_bundle
    from ..models.train import Trainer
    from .verification import calibrate, write_calibration

    result = Trainer(config, hold_out=False, facts={"cross_validation": facts}).fit()
    bundle = load_bundle(result.bundle)
    measured_on = {"method": f"out-of-fold scores of {config.cv}-fold cross-validation",
                   "pairs_file": str(config.pairs), "split_seed": config.split_seed,
                   "folds": config.cv}
    write_calibration(bundle, calibrate(positives, negatives, TARGET_FAR, bundle, measured_on))
    return result.bundle


def _settings(config: TrainConfig) -> dict[str, Any]:
    """What a saved fold must have been run with to be reused."""
    return {k: v for k, v in config.to_dict().items()
            if k not in TrainConfig.RESUMABLE | {"out", "work_dir"}} | {"epochs": config.epochs}


def cross_validate(config: TrainConfig) -> CrossValidation:
    """Run (or resume) ``config.cv``-fold cross-validation of ``config``, then train its
    model on every pair into ``OUT``; writes ``cv.json`` and ``cv.md`` into ``WORK_DIR/cv``
    and returns the figures."""
    folds = config.cv
    if folds < 2:
        raise EvaluationError(f"cross-validation needs at least 2 folds, got {folds}")
    directory = config.work_dir / "cv"
    directory.mkdir(parents=True, exist_ok=True)
    settings = _settings(config)
    records, positives, negatives = [], [], []
    bar = tqdm(range(folds), desc=f"cv {folds} folds", unit="fold", disable=not config.progress)
    for fold in bar:
        saved, scores = directory / f"fold-{fold + 1}.json", directory / f"fold-{fold + 1}.npz"
        head = head_path(directory, fold + 1) if config.keep_fold_models else None
        record = json.loads(saved.read_text()) if saved.is_file() and scores.is_file() else None
        if (record is not None and record.get("settings") == settings
                and (head is None or head.is_file())):
            with np.load(scores) as arrays:
                positive, negative = arrays["positive"], arrays["negative"]
        else:
            record, arrays = _run_fold(_fold_config(config, directory, fold), fold, folds, head)
            record["settings"] = settings
            _save_arrays(scores, arrays)
            atomic_write(saved, json.dumps(record, indent=1))
            positive, negative = arrays["positive"], arrays["negative"]
        records.append(record)
        positives.append(positive)
        negatives.append(negative)
        bar.set_postfix(top1=f"{np.mean([r['top1'] for r in records]):.3f}")
    bar.close()
    history = _mean_history(records)
    curve = [entry["top1"] for entry in history]
    positive, negative = np.concatenate(positives), np.concatenate(negatives)
    summary = _summary(records)
    facts = {"folds": folds, "summary": summary, "mean_top1_by_epoch": curve,
             "fold_minutes": [r["minutes"] for r in records]}
    bundle = _train_final(config, facts, positive, negative)
    plot_history(history, bundle / "training-curve.png")
    result = CrossValidation(records, summary, curve, directory, bundle, positive, negative)
    atomic_write(directory / "cv.json", json.dumps(result.to_dict(config), indent=1))
    atomic_write(directory / "cv.md", MARKDOWN_HEADER + markdown_row(
        str(config.out), result.summary, config.epochs) + "\n")
    return result


MARKDOWN_HEADER = ("| recipe | top-1 | top-5 | MRR | ROC-AUC | EER | TMR @ 1% FMR | epochs |\n"
                   "|---|---|---|---|---|---|---|---|\n")


def markdown_row(name: str, summary: dict[str, dict[str, float]], epochs: int) -> str:
    """One table row: each metric as ``mean ± SE`` over the folds."""
    cells = [f"{summary[k]['mean']:.3f} ± {summary[k]['se']:.3f}" for k in CV_METRICS]
    return f"| {name} | {' | '.join(cells)} | {epochs} |"
