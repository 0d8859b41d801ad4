"""Shared dependencies of the routes: the loaded model and store, and upload checks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, HTTPException, Request, UploadFile

from ..index.store import IndexStore
from ..models.embedder import Embedder
from .schemas import ModelInfo
from .settings import Settings


@dataclass
class ServiceState:
    """What the lifespan loads once and every request shares."""

    settings: Settings
    embedder: Embedder
    store: IndexStore

    @property
    def model_info(self) -> ModelInfo:
        bundle = self.embedder.bundle
        return ModelInfo(
            name=bundle.name,
            fingerprint=bundle.fingerprint,
            engine=self.embedder.engine_name,
            embedding_dim=self.embedder.dim,
        )


def get_state(request: Request) -> ServiceState:
    state = getattr(request.app.state, "lookalike", None)
    if state is None:
        raise HTTPException(503, "the model and index are still loading")
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]


async def read_upload(upload: UploadFile, settings: Settings) -> bytes:
    """Read an uploaded file, refusing more than ``max_upload_bytes`` without reading it all."""
    data = await upload.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(
            413, f"upload {upload.filename!r} is larger than {settings.max_upload_bytes:,} bytes"
        )
    if not data:
        raise HTTPException(400, f"upload {upload.filename!r} is empty (0 bytes)")
    return data
