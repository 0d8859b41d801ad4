"""The training curve: loss and validation metrics per epoch, as a PNG."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..core.files import atomic_write

__all__ = ["plot_history"]


def plot_history(history: list[dict[str, Any]], path: Path) -> None:
    """Training loss and validation top-1 / top-5 / MRR per epoch, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    epochs = [h["epoch"] for h in history]
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5), dpi=100)
    left.plot(epochs, [np.nan if h["loss"] is None else h["loss"] for h in history], marker="o")
    left.set(xlabel="epoch", ylabel="training loss", title="loss")
    for key in ("top1", "top5", "mrr"):
        right.plot(epochs, [h[key] for h in history], marker="o", label=key)
    right.set(xlabel="epoch", ylabel="validation", title="20-candidate validation", ylim=(0, 1))
    right.legend()
    figure.tight_layout()
    atomic_write(path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
