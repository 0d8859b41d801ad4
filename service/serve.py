"""Run the HTTP service: ``python -m lookalike.service.serve`` reads every setting from
``LOOKALIKE_*`` variables. This is the container's entry point, so it imports no torch (the
CLI's ``lookalike serve`` calls the same :func:`run`)."""

from __future__ import annotations

import logging

import uvicorn

from .app import create_app, load_state
from .settings import Settings


def run(settings: Settings) -> None:
    """Load model and index first, so that a bad model or index fails before binding."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    state = load_state(settings)
    logging.getLogger(__name__).info(
        "serving %s on http://%s:%d/", settings.index, settings.host, settings.port
    )
    uvicorn.run(create_app(settings, state), host=settings.host, port=settings.port)


if __name__ == "__main__":
    run(Settings())
