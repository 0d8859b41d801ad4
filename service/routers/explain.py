"""POST /explain: why two images score what they do, region by region, on both images.

Each side is an upload or an indexed key (explained from its stored thumbnail). The answer
says which method made it (``exact`` for the default model's family, ``occlusion``, an
approximation, otherwise) and which engine; see :mod:`...models.explain`.
"""

from __future__ import annotations

import time
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException
from starlette.concurrency import run_in_threadpool

from ..deps import ImageOpt, KeyOpt, StateDep, read_upload
from ..explaining import ExplainSource, explain_pair, stored_image
from ..schemas import ExplainResponse, error_responses

router = APIRouter(tags=["search"])

ERRORS = error_responses(
    {
        400: "Empty upload.",
        404: "Unknown key.",
        413: "Upload or image too large.",
        415: "Not an image in a supported format.",
        422: "Not exactly one image or key per side, an undecodable image, or a key without "
        "a stored thumbnail.",
    }
)

@router.post(
    "/explain",
    response_model=ExplainResponse,
    responses=ERRORS,
    summary="Explain the score of two images: heat maps over both and the strongest region "
    "pairs.",
)
async def explain(
    state: StateDep,
    image_a: ImageOpt = None,
    image_b: ImageOpt = None,
    key_a: KeyOpt = None,
    key_b: KeyOpt = None,
    overlays: Annotated[bool, Form(description="Include PNG heat-map overlays.")] = True,
) -> ExplainResponse:
    started = time.perf_counter()
    sources: list[ExplainSource] = []
    for side, upload, key in (("a", image_a, key_a), ("b", image_b, key_b)):
        if (upload is None) == (key is None):
            raise HTTPException(422, f"give exactly one of 'image_{side}' or 'key_{side}'")
        if upload is not None:
            sources.append((await read_upload(upload, state.settings), "upload"))
        else:
            sources.append(await run_in_threadpool(stored_image, state, key))
    explanation = await explain_pair(state, sources[0], sources[1], overlays)
    return ExplainResponse(
        explanation=explanation,
        took_ms=round((time.perf_counter() - started) * 1000, 2),
        model=state.model_info,
    )
