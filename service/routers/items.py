"""GET /items: the indexed images, their metadata and thumbnails."""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Query, Response

from ...index.store import Item, UnknownKeyError
from ..deps import StateDep
from ..schemas import ErrorOut, ItemList, ItemOut

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
    responses={200: {"content": {"image/jpeg": {}}}, 404: {"model": ErrorOut}},
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
    responses={404: {"model": ErrorOut}},
    summary="One indexed image's metadata.",
)
def get_item(key: str, state: StateDep) -> ItemOut:
    try:
        return item_out(state.store.get(key))
    except UnknownKeyError as exc:
        raise HTTPException(404, str(exc)) from exc
