"""Limits every request passes before any route runs: rate, size, time; and API keys.

The size check reads only the ``Content-Length`` header, so an oversized upload is refused
before its body is read, let alone decoded; uploads without that header are still capped while
being read (see :func:`.deps.read_upload`).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader
from starlette.responses import JSONResponse, Response

from .settings import Settings

__all__ = ["RateLimiter", "limits_middleware", "require_api_key", "WriteAccess"]

MULTIPART_OVERHEAD = 64 * 1024
"""Room for form fields and multipart boundaries on top of the file bytes."""


class RateLimiter:
    """A token bucket per client address: ``rate`` per second sustained, ``burst`` at once."""

    def __init__(self, rate: float, burst: int, max_clients: int = 10_000) -> None:
        self.rate, self.burst, self.max_clients = rate, burst, max_clients
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def retry_after(self, client: str) -> float:
        """0 if the request may go now (and take a token), else seconds to wait."""
        now = time.monotonic()
        tokens, last = self._buckets.pop(client, (float(self.burst), now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        wait = 0.0 if tokens >= 1 else (1 - tokens) / self.rate
        self._buckets[client] = (tokens - 1 if tokens >= 1 else tokens, now)
        while len(self._buckets) > self.max_clients:
            self._buckets.popitem(last=False)
        return wait


def limits_middleware(
    settings: Settings,
) -> Callable[[Request, Callable[[Request], Awaitable[Response]]], Awaitable[Response]]:
    limiter = (
        RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
        if settings.rate_limit_per_s > 0
        else None
    )
    max_body = settings.max_upload_bytes * settings.max_files_per_request + MULTIPART_OVERHEAD

    async def middleware(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if limiter is not None:
            client = request.client.host if request.client else "unknown"
            wait = limiter.retry_after(client)
            if wait > 0:
                return JSONResponse(
                    {
                        "detail": f"rate limit: at most {settings.rate_limit_per_s:g} requests/s "
                        f"per client; retry in {wait:.1f} s"
                    },
                    status_code=429,
                    headers={"Retry-After": str(max(1, round(wait)))},
                )
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                return JSONResponse({"detail": "invalid Content-Length header"}, status_code=400)
            if int(length) > max_body:
                return JSONResponse(
                    {
                        "detail": f"request body of {int(length):,} bytes is over the limit of "
                        f"{max_body:,} bytes"
                    },
                    status_code=413,
                )
        try:
            return await asyncio.wait_for(call_next(request), settings.request_timeout_s)
        except TimeoutError:
            return JSONResponse(
                {"detail": f"the request took longer than {settings.request_timeout_s:g} s"},
                status_code=503,
            )

    return middleware


api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


def require_api_key(request: Request, key: Annotated[str | None, Depends(api_key_header)]) -> None:
    """Write endpoints need one of ``settings.api_keys`` when any is configured."""
    state = getattr(request.app.state, "lookalike", None)
    keys = state.settings.api_keys if state is not None else []
    if not keys:
        return
    if key is None or not any(hmac.compare_digest(key, k) for k in keys):
        raise HTTPException(
            401,
            "this endpoint needs a valid X-API-Key header",
            headers={"WWW-Authenticate": "APIKey"},
        )


WriteAccess = Depends(require_api_key)
