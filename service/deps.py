"""Shared dependencies of the routes: the loaded model and store, and upload checks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
from fastapi import Depends, File, Form, HTTPException, Request, UploadFile
from PIL import Image
from starlette.concurrency import run_in_threadpool

from ..index.store import IndexStore
from ..models.embedder import Embedder
from ..models.preprocess import declared_work
from ..models.rerank import Reranker, reranker_for
from .batching import DirectEmbedder, MicroBatcher, Then, prepare_inputs
from .schemas import ModelInfo
from .settings import Settings


@dataclass
class ServiceState:
    """What the lifespan loads once and every request shares."""

    settings: Settings
    embedder: Embedder
    store: IndexStore
    batcher: MicroBatcher | DirectEmbedder | None = None
    """Set by the app's lifespan; routes embed through it."""

    async def decode(self, data: bytes) -> Image.Image:
        """Decode an upload in the thread pool; raises :class:`ImageDecodeError` if unusable.
        An image whose header promises more than ``large_image_pixels`` of work decodes in
        the batcher's killable worker process, under the same deadline as ``/match``'s."""
        worker = getattr(self.batcher, "decode_process", None)
        if worker is not None and declared_work(data) > self.settings.large_image_pixels:
            return await run_in_threadpool(worker.decode, data)
        return await run_in_threadpool(self.embedder.preprocessor.decode, data)

    async def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Preprocess decoded images (thread pool) and embed them -> ``(n, D)``."""
        arrays = await run_in_threadpool(self.embedder.preprocessor.batch, images)
        return await self._batcher.embed(arrays)

    async def embed_uploads(
        self,
        uploads: Sequence[bytes],
        names: Sequence[str] | None = None,
        then: Then | None = None,
    ) -> Any:
        """Decode and embed uploaded images -> ``(n, D)``, or ``then(vectors)`` when given.

        Decoding, the forward pass and ``then`` (say, the index search) all run on the
        batcher's threads, never on the event loop. A decoding error names the upload's field
        when ``names`` are given.
        """
        return await self._batcher.embed(list(uploads), names, then)

    async def describe_named(self, uploads: dict[str, bytes]) -> tuple[Reranker,
                                                                        dict[str, np.ndarray]]:
        """The model's re-ranker (a model without one fails here, before any upload is
        decoded) and the uploads' descriptions by field name, decoded and described in the
        thread pool, as /explain does."""
        reranker = await run_in_threadpool(reranker_for, self.embedder, self.settings.cache_dir)

        def described() -> dict[str, np.ndarray]:
            arrays = prepare_inputs(self.embedder.preprocessor, list(uploads.values()),
                                    list(uploads))
            return dict(zip(uploads, reranker.describe(arrays), strict=True))

        return reranker, await run_in_threadpool(described)

    async def embed_named(self, uploads: dict[str, bytes]) -> dict[str, np.ndarray]:
        """Embed uploads by field name -> ``{name: (D,) vector}``; a decoding error names the
        field it came from."""
        if not uploads:
            return {}
        vectors = await self.embed_uploads(list(uploads.values()), names=list(uploads))
        return dict(zip(uploads, vectors, strict=True))

    @property
    def _batcher(self) -> MicroBatcher | DirectEmbedder:
        if self.batcher is None:
            raise RuntimeError("the app's lifespan has not started the embedder")
        return self.batcher

    @property
    def model_info(self) -> ModelInfo:
        bundle = self.embedder.bundle
        return ModelInfo(
            name=bundle.name,
            fingerprint=bundle.fingerprint,
            engine=self.embedder.engine_name,
            embedding_dim=self.embedder.dim,
        )


async def get_state(request: Request) -> ServiceState:
    state = getattr(request.app.state, "lookalike", None)
    if state is None:
        raise HTTPException(503, "the model and index are still loading")
    return state


StateDep = Annotated[ServiceState, Depends(get_state)]

# One side of a two-image route (/compare, /explain): an upload or the key of an indexed image.
ImageOpt = Annotated[UploadFile | None, File(description="An image (JPEG, PNG, WebP, BMP, GIF).")]
KeyOpt = Annotated[str | None, Form(description="Or the key of an indexed image.")]


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
