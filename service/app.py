"""create_app(settings) -> FastAPI: routes, error handlers, the web page, and the lifespan
that loads the model and the index once."""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import faiss
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from .. import __version__
from ..core.errors import (
    BadRequestError,
    ConflictError,
    InvalidInputError,
    LookalikeError,
    NotFoundError,
    TooLargeError,
    UnavailableError,
    UnsupportedMediaError,
)
from ..index.store import IndexStore
from ..models.resolve import create_embedder
from .batching import DirectEmbedder, MicroBatcher
from .deps import ServiceState
from .metrics import MetricsMiddleware, ServiceMetrics
from .routers import compare, duplicates, explain, health, items, match, rank
from .security import LimitsMiddleware
from .settings import Settings

__all__ = ["create_app", "load_state"]

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


def load_state(settings: Settings) -> ServiceState:
    """Load the model and open the index, refusing an index built by another model."""
    faiss.omp_set_num_threads(settings.faiss_threads)
    embedder = create_embedder(settings.model_options())
    model = embedder.bundle
    if settings.create_index and not (settings.index / "manifest.json").exists():
        log.info("creating an empty index at %s", settings.index)
        IndexStore.create(
            settings.index, dim=embedder.dim, model_fingerprint=model.fingerprint,
            model_name=model.name,
        ).close()
    store = IndexStore.open(settings.index, model_fingerprint=model.fingerprint)
    log.info(
        "serving %d images from %s with model %s (%s)",
        len(store), settings.index, model.name, settings.engine,
    )
    return ServiceState(settings=settings, embedder=embedder, store=store)


def create_app(settings: Settings | None = None, state: ServiceState | None = None) -> FastAPI:
    """Build the app. ``state`` lets a caller hand in an already loaded model and store."""
    settings = settings or Settings()

    metrics = ServiceMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        sys.setswitchinterval(settings.gil_switch_interval_ms / 1000)
        loaded = state or await run_in_threadpool(load_state, settings)
        if settings.micro_batching:
            loaded.batcher = MicroBatcher(
                loaded.embedder.embed_arrays, metrics, loaded.embedder.preprocessor,
                settings.batch_max_size, settings.batch_max_wait_ms, settings.decode_workers,
                settings.large_image_pixels, settings.decode_timeout_s,
            )
        else:
            loaded.batcher = DirectEmbedder(
                loaded.embedder.embed_arrays, metrics, loaded.embedder.preprocessor
            )
        await loaded.batcher.start()
        metrics.index_items.set_function(lambda: len(loaded.store))
        app.state.lookalike = loaded
        try:
            yield
        finally:
            app.state.lookalike = None
            await loaded.batcher.stop()
            loaded.store.save()
            if state is None:
                loaded.store.close()

    app = FastAPI(
        title="lookalike",
        version=__version__,
        description="Find images that look alike: upload a query, get ranked matches with "
        "cosine scores.",
        lifespan=lifespan,
        # File parts are counted while the form is parsed (the 65th is refused, with a 400,
        # before it is read); fields allow a /match's candidates and exclusions.
        form_limits={
            "max_files": settings.max_files_per_request,
            "max_fields": settings.max_form_fields,
        },
    )
    app.state.lookalike = None
    app.add_middleware(LimitsMiddleware, settings=settings)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"]
        )
    for router in (
        health.router, match.router, rank.router, compare.router, items.router,
        items.thumbnails, duplicates.router, explain.router,
    ):
        app.include_router(router)
    _add_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/metrics", include_in_schema=False)
    def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    return app


ERROR_STATUS: dict[type[Exception], int] = {
    BadRequestError: 400,
    InvalidInputError: 422,
    NotFoundError: 404,
    ConflictError: 409,
    TooLargeError: 413,
    UnsupportedMediaError: 415,
    UnavailableError: 503,
    LookalikeError: 422,
}
"""The one mapping from error kinds to HTTP status codes: the first kind in an error's MRO
wins (every user error, the store's and the decoder's included, is a ``LookalikeError``)."""


def status_for(exc: Exception) -> int:
    """The HTTP status of a user error (see :data:`ERROR_STATUS`)."""
    for kind in type(exc).__mro__:
        if kind in ERROR_STATUS:
            return ERROR_STATUS[kind]
    return 422


def _add_error_handlers(app: FastAPI) -> None:
    """Bad input is the client's error: a 4xx with a JSON ``detail``, never a 500."""

    async def user_error(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=status_for(exc))

    for kind in ERROR_STATUS:
        app.add_exception_handler(kind, user_error)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        # The offending input may be binary (an upload in a text field): leave it out.
        errors = [{k: v for k, v in e.items() if k not in ("input", "ctx", "url")}
                  for e in exc.errors()]
        return JSONResponse({"detail": jsonable_encoder(errors)}, status_code=422)
