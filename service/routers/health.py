"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter

from ..deps import StateDep
from ..schemas import Health, Ready

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="Liveness: the process answers.")
async def health() -> Health:
    return Health(status="ok")


@router.get(
    "/ready",
    response_model=Ready,
    summary="Readiness: model and index are loaded.",
    responses={503: {"description": "Still loading."}},
)
def ready(state: StateDep) -> Ready:
    manifest = state.store.manifest
    return Ready(
        status="ready",
        items=len(state.store),
        model=state.model_info,
        index={key: manifest[key] for key in ("factory", "pca_dim", "dim", "count", "metric")},
        shards=manifest.get("shards"),
    )
