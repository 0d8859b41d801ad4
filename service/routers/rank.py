"""POST /rank: a batch of queries, each ranked against its own candidate list.

Queries and candidates are keys of indexed images or images uploaded with the request. A
keys-only batch can be a JSON body; with uploads the request is multipart: a ``spec`` field
holding the same JSON, and one file field per upload, referenced from the spec by field name
(``{"upload": "q1"}``). Each upload is decoded and embedded once, by the service's batcher,
however often the spec names it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from fastapi import APIRouter, HTTPException, Request, Response
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from ...evaluation.errors import EvaluationError
from ...evaluation.ranking import (
    AssignmentUnavailableError,
    assign,
    cosine_scores,
    ranked_order,
)
from ...models.rerank import Reranker
from ..deps import ServiceState, StateDep, read_upload
from ..schemas import (
    ImageRef,
    RankedCandidate,
    RankQuery,
    RankRequest,
    RankResponse,
    RankResult,
    error_responses,
)
from ..settings import Settings

__all__ = ["router"]

router = APIRouter(tags=["search"])

ERRORS = error_responses(
    {
        400: "Empty upload, or a malformed multipart body.",
        404: "Unknown keys (all of them are listed).",
        413: "Upload or image too large.",
        415: "A body that is neither JSON nor multipart, or an upload that is not an image.",
        422: "A spec that does not validate, too many queries or candidates, uploads missing "
        "from or not used by the spec, an undecodable image, or rerank=true with indexed keys "
        "or with a model that has no measured re-ranker.",
        501: "assign=true on an installation without scipy.",
    }
)


def _inline_schema(model: type[BaseModel]) -> dict[str, Any]:
    """``model``'s JSON schema with its ``$defs`` inlined, to embed in ``openapi_extra``."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                return resolve(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return resolve(schema)


REQUEST_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _inline_schema(RankRequest)},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["spec"],
                    "properties": {
                        "spec": {
                            "type": "string",
                            "description": "The JSON request (as for application/json).",
                        }
                    },
                    "additionalProperties": {"type": "string", "format": "binary"},
                }
            },
        },
    }
}


FORM_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refusing more than ``limit`` bytes without reading the rest."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(413, f"the request body is larger than {limit:,} bytes")
    return bytes(body)


async def _read_request(
    request: Request, settings: Settings
) -> tuple[str | bytes, dict[str, bytes]]:
    """The spec's JSON text and the uploads' bytes by field name."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    uploads: dict[str, bytes] = {}
    if content_type == "application/json":
        raw: str | bytes = await _read_body(request, settings.max_upload_bytes)
    elif content_type in FORM_TYPES:
        async with request.form(
            max_files=settings.max_rank_uploads,
            max_fields=settings.max_rank_uploads + 1,
            max_part_size=settings.max_upload_bytes,
        ) as form:
            spec = None
            for name, value in form.multi_items():
                if name in uploads or (name == "spec" and spec is not None):
                    raise HTTPException(422, f"the multipart field {name!r} appears twice")
                if isinstance(value, UploadFile):
                    uploads[name] = await read_upload(value, settings)
                elif name == "spec":
                    spec = value
                else:
                    raise HTTPException(
                        422, f"unexpected text field {name!r}: send 'spec' and image files only"
                    )
            if spec is None:
                raise HTTPException(422, "a multipart /rank needs a 'spec' field with the JSON")
            raw = spec
    else:
        raise HTTPException(
            415, "send application/json, or a form (multipart/form-data) with a 'spec' field"
        )
    return raw, uploads


def _parse(raw: str | bytes) -> RankRequest:
    try:
        return RankRequest.model_validate_json(raw)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False)) from exc


def _as_ref(ref: str | ImageRef) -> ImageRef:
    return ImageRef(key=ref) if isinstance(ref, str) else ref


def _check(
    spec: RankRequest, refs: Iterable[ImageRef], uploads: dict[str, bytes], settings: Settings
) -> None:
    if len(spec.queries) > settings.max_rank_queries:
        raise HTTPException(
            422,
            f"{len(spec.queries)} queries; the limit is {settings.max_rank_queries} per request",
        )
    for number, query in enumerate(spec.queries):
        if len(query.candidates) > settings.max_candidates:
            raise HTTPException(
                422,
                f"query {number} has {len(query.candidates)} candidates; the limit is "
                f"{settings.max_candidates}",
            )
    named = {ref.upload for ref in refs if ref.upload is not None}
    missing, unused = sorted(named - uploads.keys()), sorted(uploads.keys() - named)
    if missing:
        raise HTTPException(422, f"the spec names uploads that were not sent: {missing}")
    if unused:
        raise HTTPException(422, f"uploads not named by the spec: {unused}")


@router.post(
    "/rank",
    response_model=RankResponse,
    responses=ERRORS,
    openapi_extra=REQUEST_BODY,
    summary="Rank each query's own candidates by cosine similarity (the challenge shape).",
)
async def rank(request: Request, state: StateDep) -> Response:
    """Only I/O runs here: parsing and checking the spec, and scoring (up to 100 queries x
    1,000 candidates) and encoding the answer run in the thread pool, uploads on the
    batcher's threads, so a large batch never holds up the event loop."""
    started = time.perf_counter()
    raw, uploads = await _read_request(request, state.settings)
    spec, queries, by_key = await run_in_threadpool(_checked_spec, raw, uploads, state)
    reranker = None
    if spec.rerank:
        reranker, by_upload = await state.describe_named(uploads)
    else:
        by_upload = await state.embed_named(uploads)
    return await run_in_threadpool(_answer, state, spec, queries, by_key, by_upload, reranker,
                                   started)


Queries = list[tuple[ImageRef, list[ImageRef], list[int]]]


def _checked_spec(
    raw: str | bytes, uploads: dict[str, bytes], state: ServiceState
) -> tuple[RankRequest, Queries, dict[str, np.ndarray]]:
    """The spec, its references and the indexed vectors it names; every check (an unknown key
    too) runs before any upload is embedded."""
    spec = _parse(raw)
    queries = [(_as_ref(q.query), [_as_ref(c) for c in q.candidates]) for q in spec.queries]
    refs = [ref for query, candidates in queries for ref in (query, *candidates)]
    _check(spec, refs, uploads, state.settings)
    keys = list(dict.fromkeys(ref.key for ref in refs if ref.key is not None))
    if spec.rerank:
        if keys:
            raise HTTPException(
                422, "rerank=true needs every query and candidate uploaded: the store keeps "
                f"only thumbnails of indexed images, and {len(keys)} key(s) were given")
    by_key = dict(zip(keys, state.store.vectors(keys), strict=True))
    return spec, [_filtered(state, q, query) for q, query in zip(spec.queries, queries,
                                                               strict=True)], by_key


def _filtered(
    state: ServiceState, request_query: RankQuery, query: tuple[ImageRef, list[ImageRef]]
) -> tuple[ImageRef, list[ImageRef], list[int]]:
    """The query, the candidates its ``where`` keeps (an upload has no metadata, so a filter
    never keeps it) and their positions in the request's list."""
    ref, candidates = query
    if not request_query.where:
        return ref, candidates, list(range(len(candidates)))
    keys = [c.key for c in candidates if c.key is not None]
    passed = set(state.store.matching(keys, request_query.where))
    positions = [i for i, c in enumerate(candidates) if c.key in passed]
    return ref, [candidates[i] for i in positions], positions


def _answer(
    state: ServiceState,
    spec: RankRequest,
    queries: Queries,
    by_key: dict[str, np.ndarray],
    by_upload: dict[str, np.ndarray],
    reranker: Reranker | None,
    started: float,
) -> Response:
    """Score every query's candidates and encode the answer (runs off the event loop)."""

    def vector(ref: ImageRef) -> np.ndarray:
        return by_key[ref.key] if ref.key is not None else by_upload[ref.upload]

    def scored(query: ImageRef, candidates: list[ImageRef]) -> tuple[np.ndarray, np.ndarray]:
        """What the candidates are ranked by, and their cosines (the same without a
        re-ranker)."""
        if not candidates:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        mine, theirs = vector(query), np.stack([vector(c) for c in candidates])
        if reranker is None:
            cosines = cosine_scores(mine, theirs)
            return cosines, cosines
        return reranker.scores(mine, theirs), reranker.cosines(mine, theirs)

    both = [scored(query, candidates) for query, candidates, _ in queries]
    scores, cosines = [ranked_by for ranked_by, _ in both], [cosine for _, cosine in both]
    identities = [[(c.key, c.upload) for c in candidates] for _, candidates, _ in queries]
    try:
        chosen = assign(identities, scores) if spec.assign else [-1] * len(scores)
    except AssignmentUnavailableError as exc:
        raise HTTPException(501, str(exc)) from exc
    except EvaluationError as exc:
        raise HTTPException(422, str(exc)) from exc
    results = []
    for request_query, (query, candidates, positions), row, cosine, pick in zip(
        spec.queries, queries, scores, cosines, chosen, strict=True
    ):
        floor = request_query.min_score
        order = [i for i in ranked_order(row) if floor is None or cosine[i] >= floor]
        if pick >= 0 and pick in order:
            order.remove(pick)
            order.insert(0, pick)
        ranked = [
            RankedCandidate(
                key=candidates[i].key,
                upload=candidates[i].upload,
                position=positions[i],
                score=float(cosine[i]),
                rerank_score=float(row[i]) if reranker is not None else None,
                rank=rank,
                assigned=bool(i == pick),
            )
            for rank, i in enumerate(order[: request_query.k], start=1)
        ]
        results.append(RankResult(id=request_query.id, query=query, ranked=ranked))
    return _encoded(
        results,
        RankResponse(
            results=[],
            embedded=len(by_upload),
            took_ms=round((time.perf_counter() - started) * 1000, 2),
            model=state.model_info,
        ),
    )


def _encoded(results: list[RankResult], rest: RankResponse) -> Response:
    """The answer's JSON, encoded one result at a time: the encoder holds the GIL while it
    runs, so one call over 100,000 candidates would pause every other thread (and the event
    loop) for its whole length."""
    head = rest.model_dump_json()
    assert head.startswith('{"results":[]')  # results is the first field
    parts = [result.model_dump_json() for result in results]
    body = '{"results":[' + ",".join(parts) + "]" + head[len('{"results":[]') :]
    return Response(body, media_type="application/json")
