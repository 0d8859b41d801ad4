"""POST /match: the most similar indexed images to an uploaded image (or an indexed key)."""

from __future__ import annotations

import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, File, Form, HTTPException, UploadFile
from starlette.concurrency import run_in_threadpool

from ...index.filters import Filter
from ...index.store import Match, UnknownKeyError
from ..deps import StateDep, read_upload
from ..presenters import match_payload
from ..schemas import MatchOut, MatchResponse, error_responses

router = APIRouter(tags=["search"])

ERRORS = error_responses(
    {
        400: "Empty upload.",
        404: "Unknown query_key.",
        413: "Upload or image too large.",
        415: "Not an image in a supported format.",
        422: "Bad parameters (a bad filter or min_score too), unknown candidate keys or an "
        "undecodable image.",
    }
)


@router.post(
    "/match",
    response_model=MatchResponse,
    responses=ERRORS,
    summary="Rank indexed images by how much they look like the query.",
    operation_id="match",
)
async def match(
    state: StateDep,
    image: Annotated[
        UploadFile | None, File(description="Query image (JPEG, PNG, WebP, BMP, GIF).")
    ] = None,
    query_key: Annotated[
        str | None, Form(description="Query by an indexed image's key instead of an upload.")
    ] = None,
    k: Annotated[
        int | None, Form(description="Number of matches (default: service setting).")
    ] = None,
    candidates: Annotated[
        list[str] | None,
        Form(description="Rank only among these keys (repeat the field for each key)."),
    ] = None,
    exclude: Annotated[
        list[str] | None, Form(description="Keys to leave out of the results.")
    ] = None,
    where: Annotated[
        str | None,
        Form(description='Metadata filter as JSON, all conditions must hold: '
             '{"album": "holiday"} (equality), {"album": {"in": ["a", "b"]}}, '
             '{"year": {"gte": 2020, "lt": 2024}} (gt, gte, lt, lte on numbers), '
             '{"added": {"gte": "2026-11-25"}} or {"added": {"gte": "-7d"}} (when the '
             "image was added). Still returns k matches when k items pass."),
    ] = None,
    min_score: Annotated[
        float | None,
        Form(ge=-1.0, le=1.0, description="Leave out matches whose cosine is below this."),
    ] = None,
) -> MatchResponse:
    started = time.perf_counter()
    settings, store = state.settings, state.store
    k = settings.default_k if k is None else k
    if not 1 <= k <= settings.max_k:
        raise HTTPException(422, f"k must be between 1 and {settings.max_k}, got {k}")
    if (image is None) == (query_key is None):
        raise HTTPException(422, "give exactly one of an 'image' upload or a 'query_key'")
    if candidates and len(candidates) > settings.max_candidates:
        raise HTTPException(
            422, f"{len(candidates)} candidates; the limit is {settings.max_candidates}"
        )
    exclude = list(exclude or [])
    spec = Filter.parse(where)  # a bad filter is refused before any model work

    def find(vectors: np.ndarray) -> list[MatchOut]:
        """The matches of one query vector ``(1, D)``; runs off the event loop."""
        if not candidates:
            found = store.search(vectors, k, exclude, where=spec, min_score=min_score)
            return match_payload(store, found[0])
        try:
            ranked = store.rank(vectors[0], store.matching(candidates, spec))
        except UnknownKeyError as exc:
            raise HTTPException(422, f"candidates: {exc}") from exc
        kept = [m for m in ranked if m.key not in exclude
                and (min_score is None or m.score >= min_score)][:k]
        matches = [Match(m.key, m.score, rank) for rank, m in enumerate(kept, start=1)]
        return match_payload(store, matches)

    if image is not None:
        data = await read_upload(image, settings)
        # Decoding, the forward pass and the search all run on the batcher's threads.
        matches = await state.embed_uploads([data], then=find)
    else:
        try:
            vectors = store.vectors([query_key])
        except UnknownKeyError as exc:
            raise HTTPException(404, str(exc)) from exc
        exclude.append(query_key)
        matches = await run_in_threadpool(find, vectors)
    return MatchResponse(
        matches=matches,
        took_ms=round((time.perf_counter() - started) * 1000, 2),
        model=state.model_info,
    )
