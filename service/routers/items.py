"""GET /items: the indexed images, their metadata and thumbnails."""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, File, Form, HTTPException, Query, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from ...index.store import DuplicateKeyError, Item, UnknownKeyError
from ...models.preprocess import make_thumbnail
from ..deps import StateDep, read_upload
from ..schemas import ItemList, ItemOut, Removed, error_responses
from ..security import WriteAccess

router = APIRouter(prefix="/items", tags=["items"])


def thumbnail_url(item: Item) -> str | None:
    return f"/items/{quote(item.key, safe='/')}/thumbnail" if item.has_thumbnail else None


def item_out(item: Item) -> ItemOut:
    return ItemOut(key=item.key, metadata=item.metadata, thumbnail_url=thumbnail_url(item))


@router.get("", response_model=ItemList, summary="List indexed images, in insertion order.")
def list_items(
    state: StateDep,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ItemList:
    items = state.store.items(offset, limit)
    return ItemList(total=len(state.store), offset=offset, items=[item_out(i) for i in items])


@router.get(
    "/{key:path}/thumbnail",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}, **error_responses({404: "Unknown key."})},
    summary="A small JPEG of an indexed image.",
)
def thumbnail(key: str, state: StateDep) -> Response:
    try:
        data = state.store.thumbnail(key)
    except UnknownKeyError as exc:
        raise HTTPException(404, str(exc)) from exc
    if data is None:
        raise HTTPException(404, f"item {key!r} was indexed without a thumbnail")
    return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})


@router.get(
    "/{key:path}",
    response_model=ItemOut,
    responses=error_responses({404: "Unknown key."}),
    summary="One indexed image's metadata.",
)
def get_item(key: str, state: StateDep) -> ItemOut:
    try:
        return item_out(state.store.get(key))
    except UnknownKeyError as exc:
        raise HTTPException(404, str(exc)) from exc


WRITE_ERRORS = error_responses(
    {
        400: "Empty upload.",
        401: "Missing or wrong X-API-Key (when keys are configured).",
        409: "The key is already indexed (send replace=true).",
        413: "Upload or image too large.",
        415: "Not an image in a supported format.",
        422: "Bad key, metadata or image.",
    }
)


@router.post(
    "",
    response_model=ItemOut,
    status_code=201,
    responses=WRITE_ERRORS,
    dependencies=[WriteAccess],
    summary="Add an image to the index (durable once answered).",
)
async def add_item(
    state: StateDep,
    image: Annotated[UploadFile, File(description="The image to index.")],
    key: Annotated[str, Form(min_length=1, max_length=512, description="Its unique key.")],
    metadata: Annotated[
        str, Form(description="A JSON object stored with the item and returned with matches.")
    ] = "{}",
    replace: Annotated[bool, Form(description="Overwrite an item with the same key.")] = False,
) -> ItemOut:
    try:
        meta: Any = json.loads(metadata)
    except json.JSONDecodeError as exc:
        raise HTTPException(422, f"metadata is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict):
        raise HTTPException(422, "metadata must be a JSON object")
    data = await read_upload(image, state.settings)
    decoded = await state.decode(data)
    thumbnail = await run_in_threadpool(make_thumbnail, decoded)
    (vector,) = await state.embed_images([decoded])
    try:
        await run_in_threadpool(
            state.store.add,
            [key],
            vector[None],
            sha256=[hashlib.sha256(data).hexdigest()],
            metadata=[meta],
            thumbnails=[thumbnail],
            replace=replace,
        )
    except DuplicateKeyError as exc:
        raise HTTPException(409, str(exc)) from exc
    return item_out(state.store.get(key))


@router.delete(
    "/{key:path}",
    response_model=Removed,
    responses=error_responses({401: "Missing or wrong X-API-Key.", 404: "Unknown key."}),
    dependencies=[WriteAccess],
    summary="Remove an image from the index.",
)
async def remove_item(key: str, state: StateDep) -> Removed:
    try:
        await run_in_threadpool(state.store.remove, [key])
    except UnknownKeyError as exc:
        raise HTTPException(404, str(exc)) from exc
    return Removed(removed=key, items=len(state.store))
