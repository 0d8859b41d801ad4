"""The evaluation's figures, drawn with Matplotlib's object API on the Agg canvas.

No pyplot: figures are plain objects with no global state, so plotting works in a server thread
or a headless CI job and never opens a window. Each function writes one PNG and returns its path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import precision_recall_curve, roc_curve

from ..core.files import atomic_write
from ..models.preprocess import decode_image
from .verification import labelled_scores

__all__ = [
    "GridRow",
    "roc_plot",
    "precision_recall_plot",
    "score_histogram",
    "embedding_map",
    "top_matches_grid",
    "plot_curves",
]

MATCH, OTHER = "#2a9d55", "#c0392b"


def _figure(width: float = 5.5, height: float = 4.5, dpi: int = 110) -> Figure:
    figure = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(figure)
    return figure


def _save(figure: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    return atomic_write(path, lambda target: figure.savefig(target, format="png"))


def roc_plot(
    positive: np.ndarray,
    negative: np.ndarray,
    path: Path,
    auc: float,
    operating_point: tuple[float, float] | None = None,
) -> Path:
    """ROC curve; ``operating_point`` = (false-match rate, true-match rate) of the threshold."""
    fpr, tpr, _ = roc_curve(*labelled_scores(positive, negative))
    figure = _figure()
    axes = figure.add_subplot()
    axes.plot(fpr, tpr, color="#1f5fa8", label=f"model (AUC {auc:.3f})")
    axes.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    if operating_point is not None:
        far, tpr = operating_point
        axes.scatter(
            far, tpr, color=OTHER, zorder=3, label=f"threshold (FAR {far:.3f}, TPR {tpr:.3f})"
        )
    axes.set(
        xlabel="false-match rate",
        ylabel="true-match rate",
        title="Pair verification: ROC",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    axes.legend(loc="lower right")
    return _save(figure, path)


def precision_recall_plot(
    positive: np.ndarray, negative: np.ndarray, path: Path, average_precision: float
) -> Path:
    """Precision-recall of "is this a matching pair?" over all scored pairs."""
    precision, recall, _ = precision_recall_curve(*labelled_scores(positive, negative))
    base = len(positive) / (len(positive) + len(negative))
    figure = _figure()
    axes = figure.add_subplot()
    axes.plot(recall, precision, color="#1f5fa8", label=f"model (AP {average_precision:.3f})")
    axes.axhline(base, color="grey", linestyle=":", label=f"chance ({base:.4f})")
    axes.set(
        xlabel="recall",
        ylabel="precision",
        title="Pair verification: precision-recall",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    axes.legend(loc="upper right")
    return _save(figure, path)


def score_histogram(
    positive: np.ndarray, negative: np.ndarray, path: Path, threshold: float | None = None
) -> Path:
    """Densities of matching vs non-matching cosines: their overlap is the verification error."""
    figure = _figure(6.5, 4.0)
    axes = figure.add_subplot()
    bins = np.linspace(min(positive.min(), negative.min()), max(positive.max(), negative.max()), 60)
    axes.hist(
        negative,
        bins=bins,
        density=True,
        alpha=0.55,
        color=OTHER,
        label=f"non-matching ({len(negative):,})",
    )
    axes.hist(
        positive,
        bins=bins,
        density=True,
        alpha=0.55,
        color=MATCH,
        label=f"matching ({len(positive):,})",
    )
    if threshold is not None:
        axes.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3f}")
    axes.set(xlabel="cosine score", ylabel="density", title="Scores of matching vs other pairs")
    axes.legend()
    return _save(figure, path)


def embedding_map(
    left: np.ndarray, right: np.ndarray, path: Path, seed: int = 0, max_pairs: int = 300
) -> Path:
    """t-SNE map of pairs' embeddings; a grey segment joins each true pair.

    Short segments mean the model puts look-alikes together. At most ``max_pairs`` pairs (a
    seeded sample) are drawn: t-SNE is quadratic and a denser map is unreadable anyway.
    """
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.permutation(len(left))[:max_pairs])
    points = np.concatenate([left[chosen], right[chosen]])
    reduced = PCA(n_components=min(50, *points.shape), random_state=seed).fit_transform(points)
    perplexity = float(min(30.0, (len(points) - 1) / 3))
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        reduced
    )
    n = len(chosen)
    figure = _figure(6.0, 6.0)
    axes = figure.add_subplot()
    for i in range(n):
        axes.plot(xy[[i, n + i], 0], xy[[i, n + i], 1], color="grey", linewidth=0.5, alpha=0.6)
    axes.scatter(xy[:n, 0], xy[:n, 1], s=10, color="#1f5fa8", label="left (query)")
    axes.scatter(xy[n:, 0], xy[n:, 1], s=10, marker="^", color="#e08a1e", label="right (match)")
    axes.set(title=f"t-SNE of embeddings ({n} pairs)", xticks=[], yticks=[])
    axes.legend(loc="best")
    return _save(figure, path)


@dataclass(frozen=True)
class GridRow:
    """One query of the grid and its best candidates: ``(path, score, is_true_match)``."""

    query: Path
    matches: Sequence[tuple[Path, float, bool]]


def _thumbnail(path: Path, size: int = 160) -> np.ndarray:
    image = decode_image(path.read_bytes(), draft_size=size)
    image.thumbnail((size, size))
    return np.asarray(image)


def top_matches_grid(rows: Sequence[GridRow], path: Path) -> Path:
    """Queries (first column) with their top matches; the true match is framed in green."""
    columns = 1 + max(len(row.matches) for row in rows)
    figure = _figure(1.5 * columns, 1.75 * len(rows), dpi=80)
    for r, row in enumerate(rows):
        axes = figure.add_subplot(len(rows), columns, r * columns + 1)
        axes.imshow(_thumbnail(row.query))
        axes.set_title(f"query {row.query.stem}", fontsize=8)
        axes.set_axis_off()
        for c, (match, score, is_answer) in enumerate(row.matches, start=2):
            axes = figure.add_subplot(len(rows), columns, r * columns + c)
            axes.imshow(_thumbnail(match))
            axes.set_title(
                f"{c - 1}. {score:.3f}", fontsize=8, color=MATCH if is_answer else "black"
            )
            axes.set_xticks([])
            axes.set_yticks([])
            for spine in axes.spines.values():
                spine.set_visible(is_answer)
                spine.set_color(MATCH)
                spine.set_linewidth(3)
    return _save(figure, path)


def plot_curves(
    lines: dict[str, tuple[Sequence[float], Sequence[float]]], path: Path, *, xlabel: str,
    ylabel: str, title: str, mark: float | None = None,
) -> Path:
    """Named ``(x, y)`` lines on one chart (solid for names ending in ``precision``, dashed
    otherwise), with a vertical line at ``mark`` (the chosen threshold)."""
    figure = _figure(6.5, 4.5)
    axes = figure.add_subplot()
    for name, (x, y) in lines.items():
        axes.plot(x, y, label=name, linestyle="-" if name.endswith("precision") else "--")
    if mark is not None:
        axes.axvline(mark, color="grey", linestyle=":", label=f"chosen {mark:.2f}")
    axes.set(xlabel=xlabel, ylabel=ylabel, title=title, ylim=(0, 1.01))
    axes.legend(loc="lower left", fontsize="small")
    return _save(figure, path)
