"""Near-duplicate groups of the indexed images, paged for a review page.

Paging is by cursor, not offset, so pages stay stable while images are added: groups are
ordered by their *anchor*, their earliest-added image, and ``after`` names the anchor the last
page ended with. An added image gets the newest place, so it either joins a group (whose
anchor stays) or starts a group after all existing ones: a client walking the pages sees every
group that existed when it started, exactly once. (An offset would shift by one for each group
that appeared before it.) The groups are recomputed on each request from the store, so a
removal shows at once.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query

from ...core.errors import InvalidInputError
from ...index.dedup import DedupParams, DuplicateGroup, KeypointCache, find_duplicate_groups
from ...models.model import DEDUP_KEY
from ..deps import StateDep
from ..presenters import item_out
from ..schemas import DuplicateGroupOut, DuplicatePage, DuplicatePairOut, error_responses

router = APIRouter(prefix="/duplicates", tags=["duplicates"])

KEYPOINTS = KeypointCache()
"""Shared by every request: the next page, or the same page after an add, finds the
keypoints of the images it has seen already."""


class StaleCursorError(InvalidInputError):
    """The ``after`` cursor names an image that is no longer indexed."""


def _page(groups: list[DuplicateGroup], order: dict[str, int], after: str | None,
          limit: int) -> tuple[list[DuplicateGroup], str | None]:
    if after is not None:
        if after not in order:
            raise StaleCursorError(
                f"the page cursor {after!r} was removed from the index; start again from the "
                "first page (without 'after')")
        groups = [group for group in groups if order[group.keys[0]] > order[after]]
    page = groups[:limit]
    more = len(groups) > limit
    return page, (page[-1].keys[0] if more else None)


@router.get(
    "",
    response_model=DuplicatePage,
    responses=error_responses({422: "Bad threshold or limit, or a cursor that was removed."}),
    summary="Groups of near-duplicate images, paged by cursor.",
)
def list_duplicates(
    state: StateDep,
    after: Annotated[str | None, Query(description="`next_after` of the previous page.")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    threshold: Annotated[float | None, Query(ge=-1.0, le=1.0, description=(
        "Duplicate score a pair needs (keypoint share blended with the cosine) "
        "[default: the model's calibration]."))] = None,
) -> DuplicatePage:
    calibration = state.embedder.bundle.calibration
    params = DedupParams.from_calibration(calibration, threshold=threshold)
    store = state.store
    groups = find_duplicate_groups(store, params, cache=KEYPOINTS)
    order = {key: position for position, key in enumerate(store.keys())}
    page, next_after = _page(groups, order, after, limit)
    items = store.get_many([key for group in page for key in group.keys])
    return DuplicatePage(
        groups=[
            DuplicateGroupOut(
                anchor=group.keys[0], score=group.score,
                items=[item_out(items[key]) for key in group.keys if key in items],
                pairs=[DuplicatePairOut(a=a, b=b, score=s, cosine=c) for a, b, s, c in group.pairs],
            )
            for group in page
        ],
        next_after=next_after,
        threshold=params.threshold,
        calibrated=threshold is None and DEDUP_KEY in (calibration or {}),
    )
