"""Score a challenge file from image folders: resolve keys, embed each image once, rank.

Kept apart from :mod:`.ranking` (pure numpy, imported by the HTTP service) because it reads
folders and shows progress bars, which only the command line needs.
"""

from __future__ import annotations

import numpy as np

from ..models.embedder import Embedder
from ..models.rerank import Reranker
from .challenge import Challenge
from .images import ImageFolder, embed_unique
from .ranking import assign, boost_assigned, cosine_scores

__all__ = ["score_challenge"]


def score_challenge(
    challenge: Challenge,
    query_folder: ImageFolder,
    candidate_folder: ImageFolder,
    embedder: Embedder,
    *,
    use_assignment: bool = False,
    reranker: Reranker | None = None,
    batch_size: int = 32,
    progress: bool = True,
) -> list[np.ndarray]:
    """Scores for every candidate of every query, in the file's order: cosines, or the
    ``reranker``'s scores (cosine + weight x learned region late interaction).

    All keys are resolved to files before anything is embedded, so a missing image fails in
    a second, not after an hour; then each unique file is embedded (or described) once.
    """
    query_paths = query_folder.paths(challenge.queries)
    candidate_paths = candidate_folder.paths(k for row in challenge.candidates for k in row)
    vectors = embed_unique(
        reranker.embedder() if reranker is not None else embedder,
        [*query_paths.values(), *candidate_paths.values()],
        batch_size=batch_size,
        progress=progress,
    )
    score = reranker.scores if reranker is not None else cosine_scores
    scores = [
        score(
            vectors[query_paths[query]],
            np.stack([vectors[candidate_paths[key]] for key in row]),
        )
        for query, row in zip(challenge.queries, challenge.candidates, strict=True)
    ]
    if use_assignment:
        scores = boost_assigned(scores, assign(challenge.candidates, scores))
    return scores
