"""The indexed images: list, read, add and remove items, and their thumbnails.

Thumbnails live under their own prefix (``/thumbnails/{key}``) rather than below the item
(``/items/{key}/thumbnail``): keys may hold slashes, so a key ending in ``/thumbnail`` would
otherwise name a route instead of an item.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, HTTPException, Query, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from ...core.files import bytes_sha256
from ...core.metadata import MetadataError, parse_metadata
from ...index.store import DuplicateKeyError, UnknownKeyError
from ...models.preprocess import make_thumbnail
from ..deps import StateDep, read_upload
from ..presenters import item_out
from ..schemas import ItemList, ItemOut, Removed, error_responses
from ..security import WriteAccess

router = APIRouter(prefix="/items", tags=["items"])
thumbnails = APIRouter(prefix="/thumbnails", tags=["items"])

MAX_OFFSET = 2**53 - 1
"""The largest offset a page may start at: every JSON reader holds it exactly (it is echoed
back), and SQLite's 64-bit OFFSET cannot overflow."""


@router.get("", response_model=ItemList, summary="List indexed images, in insertion order.")
def list_items(
    state: StateDep,
    offset: Annotated[int, Query(ge=0, le=MAX_OFFSET)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ItemList:
    items = state.store.items(offset, limit)
    return ItemList(total=len(state.store), offset=offset, items=[item_out(i) for i in items])


@thumbnails.get(
    "/{key:path}",
    response_class=Response,
    responses={200: {"content": {"image/jpeg": {}}}, **error_responses({404: "Unknown key."})},
    summary="A small JPEG of an indexed image.",
    operation_id="thumbnail",
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
    operation_id="get_item",
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


ITEM_LINKS = {
    "GetItem": {"operationId": "get_item", "parameters": {"key": "$response.body#/key"}},
    "GetThumbnail": {"operationId": "thumbnail", "parameters": {"key": "$response.body#/key"}},
    "MatchItem": {"operationId": "match", "requestBody": {"query_key": "$response.body#/key"}},
    "MatchAmongItem": {
        "operationId": "match", "requestBody": {"candidates": ["$response.body#/key"]}
    },
    "RemoveItem": {"operationId": "remove_item", "parameters": {"key": "$response.body#/key"}},
}
"""OpenAPI links from an added item to the routes that take its key (clients and the stateful
schema test follow them)."""


@router.post(
    "",
    response_model=ItemOut,
    status_code=201,
    responses={**WRITE_ERRORS, 201: {"description": "The item as stored.", "links": ITEM_LINKS}},
    operation_id="add_item",
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
    try:  # checked before anything is decoded or stored: a refused write stores nothing
        meta = parse_metadata(metadata)
    except MetadataError as exc:
        raise HTTPException(422, str(exc)) from exc
    data = await read_upload(image, state.settings)
    decoded = await state.decode(data)
    thumbnail = await run_in_threadpool(make_thumbnail, decoded)
    (vector,) = await state.embed_images([decoded])
    try:
        await run_in_threadpool(
            state.store.add,
            [key],
            vector[None],
            sha256=[bytes_sha256(data)],
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
    operation_id="remove_item",
)
async def remove_item(key: str, state: StateDep) -> Removed:
    try:
        await run_in_threadpool(state.store.remove, [key])
    except UnknownKeyError as exc:
        raise HTTPException(404, str(exc)) from exc
    return Removed(removed=key, items=len(state.store))
