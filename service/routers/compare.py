"""POST /compare: do two images look alike? A cosine score and a same/different verdict.

The verdict uses the model's calibrated threshold (``calibration.json`` in the bundle, written
by ``lookalike evaluate --write-calibration`` for a chosen false-match rate). A model without
one falls back to the service's ``compare_threshold`` and says so (``calibrated: false``).
A model whose calibration has a ``hubness`` entry is judged on ``cosine - (hubness(a) +
hubness(b)) / 2`` (each image's mean cosine to its ``k`` nearest training images, the model's
cohort) at that entry's threshold, fitted on out-of-fold scores (issue 14).

With ``rerank=true`` (both images uploaded; a model with a calibrated re-ranker, such as
``accurate``) the verdict is on the re-ranked pair score instead, ``cosine + weight x MaxSim``
over learned regions, minus half of each image's hubness against the model's cohort when its
calibration says so, at its own threshold fitted on out-of-fold scores (issue 14; the figures
are in ``calibration`` of the response).
"""

from __future__ import annotations

import time
from typing import Annotated

import numpy as np
from fastapi import APIRouter, Form, HTTPException, UploadFile

from ...models.verdict import plain_verdict, reranked_verdict
from ..deps import ImageOpt, KeyOpt, ServiceState, StateDep, read_upload
from ..schemas import CompareResponse, error_responses

router = APIRouter(tags=["search"])

ERRORS = error_responses(
    {
        400: "Empty upload.",
        404: "Unknown key.",
        413: "Upload or image too large.",
        415: "Not an image in a supported format.",
        422: "Not exactly one image or key per side, an undecodable image, or rerank=true with "
        "a key or a model without a calibrated re-ranker.",
    }
)

async def _vectors(
    state: ServiceState, sides: dict[str, tuple[UploadFile | None, str | None]]
) -> dict[str, np.ndarray]:
    """One vector per side, from its upload or its key; uploads are embedded off the loop."""
    uploads, keys = {}, {}
    for side, (upload, key) in sides.items():
        if (upload is None) == (key is None):
            raise HTTPException(422, f"give exactly one of 'image_{side}' or 'key_{side}'")
        if upload is not None:
            uploads[f"image_{side}"] = await read_upload(upload, state.settings)
        else:
            keys[side] = key
    vectors = dict(zip(keys.keys(), state.store.vectors(list(keys.values())), strict=True))
    embedded = await state.embed_named(uploads)
    vectors.update((name.removeprefix("image_"), vector) for name, vector in embedded.items())
    return vectors


@router.post(
    "/compare",
    response_model=CompareResponse,
    responses=ERRORS,
    summary="Score two images and say whether they look alike at the calibrated threshold.",
)
async def compare(
    state: StateDep,
    image_a: ImageOpt = None,
    image_b: ImageOpt = None,
    key_a: KeyOpt = None,
    key_b: KeyOpt = None,
    rerank: Annotated[bool, Form(description=(
        "Judge by the model's calibrated re-ranked pair score (cosine + weight x MaxSim over "
        "learned regions, image_a's regions to image_b's, minus half of each image's hubness: "
        "its mean cosine to its nearest training images) at its own threshold; both images "
        "uploaded."))] = False,
) -> CompareResponse:
    started = time.perf_counter()
    if rerank:
        if key_a is not None or key_b is not None:
            raise HTTPException(422, "rerank=true needs both images uploaded: the store keeps "
                                "only thumbnails of indexed images")
        if image_a is None or image_b is None:
            raise HTTPException(422, "give 'image_a' and 'image_b'")
        uploads = {f"image_{side}": await read_upload(upload, state.settings)
                   for side, upload in (("a", image_a), ("b", image_b))}
        reranker, described = await state.describe_named(uploads)
        verdict = reranked_verdict(reranker, described["image_a"], described["image_b"])
    else:
        vectors = await _vectors(state, {"a": (image_a, key_a), "b": (image_b, key_b)})
        verdict = plain_verdict(state.embedder.bundle, vectors["a"], vectors["b"],
                                state.settings.compare_threshold)
    calibration = verdict.calibration
    return CompareResponse(
        score=verdict.score,
        rerank_score=verdict.rerank_score,
        verdict_score=verdict.verdict_score,
        same=verdict.same,
        threshold=verdict.threshold,
        calibrated=verdict.calibrated,
        target_far=calibration.get("target_far") if calibration else None,
        calibration=calibration,
        took_ms=round((time.perf_counter() - started) * 1000, 2),
        model=state.model_info,
    )
