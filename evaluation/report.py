"""The evaluation report: ``metrics.json`` for machines, ``report.md`` and PNGs for people."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..core.files import atomic_write

__all__ = ["write_report", "summary_lines"]

FIGURE_TITLES = {
    "roc": "ROC curve (pair verification)",
    "precision_recall": "Precision-recall (pair verification)",
    "score_histogram": "Scores of matching vs non-matching pairs",
    "embedding_map": "2-D map of the embeddings (t-SNE)",
    "top_matches": "Queries with their top-5 candidates (true match framed in green)",
}


def _table(rows: dict[str, Any]) -> list[str]:
    lines = ["| metric | value |", "|---|---|"]
    for name, value in rows.items():
        if isinstance(value, dict | list):
            continue
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        lines.append(f"| {name} | {shown} |")
    return lines


def write_report(out_dir: Path, metrics: dict[str, Any]) -> Path:
    """Write ``metrics.json`` and ``report.md`` (which links the figures) into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(out_dir / "metrics.json", json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    model, data = metrics["model"], metrics["data"]
    lines = [
        f"# lookalike evaluation: {model['name']}",
        "",
        f"Model `{model['name']}` (fingerprint `{model['fingerprint'][:12]}`, engine "
        f"{model['engine']}); {metrics['timing']['images']} images embedded in "
        f"{metrics['timing']['embed_s']:.1f} s. All numbers are also in `metrics.json`.",
        "",
        "Data: " + ", ".join(f"{key} = {value}" for key, value in data.items()),
        "",
    ]
    sections = {
        "candidates": "Candidate sets (cosine ranking)",
        "candidates_assign": "Candidate sets with one-to-one assignment (--assign, transductive)",
        "retrieval": "Retrieval over an index of the right images",
        "verification": "Pair verification",
        "calibration": "Calibrated threshold",
        "two_of_three": "Two of three",
    }
    for key, title in sections.items():
        if key in metrics:
            lines += [f"## {title}", "", *_table(metrics[key]), ""]
    lines += ["## Figures", ""]
    for name, file in metrics["figures"].items():
        lines += [f"### {FIGURE_TITLES.get(name, name)}", "", f"![{name}]({file})", ""]
    return atomic_write(out_dir / "report.md", "\n".join(lines))


def summary_lines(metrics: dict[str, Any]) -> list[str]:
    """The headline numbers, one line per test, for a terminal."""
    ranked, assigned = metrics["candidates"], metrics["candidates_assign"]
    retrieval, verification = metrics["retrieval"], metrics["verification"]
    calibration = metrics["calibration"]
    return [
        f"candidate sets ({ranked['n']} x {ranked['candidates']}): top-1 {ranked['top1']:.4f}  "
        f"top-5 {ranked['top5']:.4f}  MRR {ranked['mrr']:.4f}",
        f"  with --assign: top-1 {assigned['top1']:.4f}  top-5 {assigned['top5']:.4f}  "
        f"MRR {assigned['mrr']:.4f}",
        f"retrieval over {retrieval['index_size']} images: P@1 {retrieval['precision@1']:.4f}  "
        f"R@10 {retrieval['recall@10']:.4f}  MAP@10 {retrieval['map@10']:.4f}",
        f"verification: AUC {verification['auc']:.4f}  EER {verification['eer']:.4f}  "
        f"threshold {calibration['threshold']:.4f} at false-match rate {calibration['far']:.4f} "
        f"(true-match rate {calibration['tpr']:.4f})",
        f"two of three: {metrics['two_of_three']['accuracy']:.4f} (chance 0.3333)",
    ]
