"""Store objects as the API shows them: items and matches with their thumbnail URLs.

Routers share these instead of importing each other.
"""

from __future__ import annotations

from urllib.parse import quote

from ..index.store import IndexStore, Item, Match
from .schemas import ItemOut, MatchOut

__all__ = ["item_out", "match_payload", "thumbnail_url"]


def thumbnail_url(item: Item) -> str | None:
    return f"/thumbnails/{quote(item.key, safe='/')}" if item.has_thumbnail else None


def item_out(item: Item) -> ItemOut:
    return ItemOut(key=item.key, metadata=item.metadata, thumbnail_url=thumbnail_url(item))


def match_payload(store: IndexStore, matches: list[Match]) -> list[MatchOut]:
    """Attach metadata and thumbnail URLs to bare matches."""
    items = store.get_many([match.key for match in matches])
    return [
        MatchOut(
            key=match.key,
            score=match.score,
            rank=match.rank,
            metadata=items[match.key].metadata,
            thumbnail_url=thumbnail_url(items[match.key]),
        )
        for match in matches
        if match.key in items
    ]
