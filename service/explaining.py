"""Explaining scores in the service: one :class:`~..models.explain.Explainer` per embedder,
images from uploads or from an item's stored thumbnail, and the API's shape of an explanation.

``/explain`` and ``/match?explain=true`` share this (routers never import each other). Every
step that costs CPU (decoding, preprocessing, the per-location forward pass, drawing the
overlays) runs in the thread pool, never on the event loop.
"""

from __future__ import annotations

import numpy as np
from starlette.concurrency import run_in_threadpool

from ..core.errors import InvalidInputError
from ..models.explain import Explainer, Explanation, explainer_for
from ..models.explain_picture import overlay_data_url
from .deps import ServiceState
from .schemas import ExplanationOut, MatchOut, RegionPairOut

__all__ = ["ExplainSource", "explain_matches", "explain_pair", "stored_image"]

ExplainSource = tuple[bytes, str]
"""Image bytes and where they came from (``upload`` or ``thumbnail``)."""


def _explainer(state: ServiceState) -> Explainer:
    return explainer_for(state.embedder, state.settings.cache_dir)


def stored_image(state: ServiceState, key: str) -> ExplainSource:
    """An indexed item's image for explaining: its stored thumbnail (the store keeps no
    originals). Unknown key: the store's 404 error; no thumbnail: a 422."""
    data = state.store.thumbnail(key)
    if data is None:
        raise InvalidInputError(
            f"item {key!r} has no stored thumbnail to explain (indexed without thumbnails)"
        )
    return data, "thumbnail"


async def explain_pair(
    state: ServiceState, query: ExplainSource, match: ExplainSource, overlays: bool = True
) -> ExplanationOut:
    """Explain the cosine of two images (decoding errors are the usual 4xx)."""
    explainer = await run_in_threadpool(_explainer, state)

    def work() -> ExplanationOut:
        preprocessor = state.embedder.preprocessor
        arrays = [preprocessor(preprocessor.decode(data)) for data, _ in (query, match)]
        explanation = explainer.explain(*arrays)
        return explanation_out(explanation, {"query": query[1], "match": match[1]}, overlays)

    return await run_in_threadpool(work)


async def explain_matches(
    state: ServiceState, query: ExplainSource, matches: list[MatchOut]
) -> list[MatchOut]:
    """``matches`` with the first ``settings.explain_top`` explained against ``query``."""
    for match in matches[: state.settings.explain_top]:
        stored = await run_in_threadpool(stored_image, state, match.key)
        match.explanation = await explain_pair(state, query, stored)
    return matches


def explanation_out(
    explanation: Explanation, sources: dict[str, str], overlays: bool
) -> ExplanationOut:
    """The API's view: small rounded arrays (6 decimals keep the exact sum within 1e-4),
    the strongest pairs, and PNG overlays as data URLs."""
    return ExplanationOut(
        method=explanation.method,
        exact=explanation.exact,
        engine=explanation.engine,
        score=round(explanation.score, 6),
        grid=explanation.grid,
        constant=None if explanation.constant is None else round(explanation.constant, 6),
        query_map=_rounded(explanation.query_map),
        match_map=_rounded(explanation.match_map),
        pairs=[RegionPairOut(query=p.query, match=p.match, contribution=round(p.contribution, 6))
               for p in explanation.top_pairs()],
        sources=sources,
        note=explanation.note,
        query_overlay=overlay_data_url(explanation, "query") if overlays else None,
        match_overlay=overlay_data_url(explanation, "match") if overlays else None,
    )


def _rounded(values: np.ndarray) -> list[list[float]]:
    return np.round(values, 6).tolist()
