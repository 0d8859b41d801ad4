"""Limits every request passes before any route runs: rate, size, time; and API keys.

The body size is checked twice: from the ``Content-Length`` header, so a declared oversized
upload is refused before its body is read, and while the body streams in, so a chunked body
(or one whose header lies) is refused the moment it passes the limit, never spooled to disk.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import OrderedDict
from typing import Annotated

from fastapi import Depends, HTTPException, Request
from fastapi.security import APIKeyHeader
from starlette.datastructures import Headers
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .settings import Settings

__all__ = ["RateLimiter", "LimitsMiddleware", "require_api_key", "WriteAccess"]

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


SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff")]
"""On every answer: a browser must not guess a type other than the one declared (say, run an
upload's bytes as a script)."""


class BodyTooLargeError(HTTPException):
    """The body streamed past the limit: raised from ``receive`` into whatever reads it, which
    lets it through as the HTTPException it is (a 413 with a JSON ``detail``)."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"request body is over the limit of {limit:,} bytes",
            headers={"Connection": "close"},  # the rest of the body is not worth reading
        )


class LimitsMiddleware:
    """Pure ASGI middleware (no extra task or body stream per request, unlike
    ``@app.middleware("http")``): rate limit, body size (declared and streamed), request
    timeout, and :data:`SECURITY_HEADERS` on every answer."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self.limiter = (
            RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
            if settings.rate_limit_per_s > 0
            else None
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_secured(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        refusal = self.refusal(scope)
        if refusal is not None:
            await refusal(scope, receive, send_secured)
            return
        received, limit = 0, self.settings.max_body_bytes_for(scope["path"])

        async def receive_counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(limit)
            return message

        deadline = asyncio.timeout(self.settings.request_timeout_s)
        try:
            async with deadline:
                await self.app(scope, receive_counted, send_secured)
        except BodyTooLargeError as exc:  # read outside a route (none today): answer it here
            if started:
                raise
            await JSONResponse(
                {"detail": exc.detail}, status_code=413, headers=exc.headers
            )(scope, receive, send_secured)
        except TimeoutError:
            if not deadline.expired() or started:
                raise
            await JSONResponse(
                {"detail": f"the request took longer than {self.settings.request_timeout_s:g} s"},
                status_code=503,
            )(scope, receive, send_secured)

    def refusal(self, scope: Scope) -> Response | None:
        """The response refusing this request before it runs, or None to let it through."""
        settings = self.settings
        if self.limiter is not None:
            client = scope["client"][0] if scope.get("client") else "unknown"
            wait = self.limiter.retry_after(client)
            if wait > 0:
                return JSONResponse(
                    {
                        "detail": f"rate limit: at most {settings.rate_limit_per_s:g} requests/s "
                        f"per client; retry in {wait:.1f} s"
                    },
                    status_code=429,
                    headers={"Retry-After": str(max(1, round(wait)))},
                )
        length = Headers(scope=scope).get("content-length")
        if length is None:
            return None
        if not length.isdigit():
            return JSONResponse({"detail": "invalid Content-Length header"}, status_code=400)
        limit = settings.max_body_bytes_for(scope["path"])
        if int(length) > limit:
            return JSONResponse(
                {
                    "detail": f"request body of {int(length):,} bytes is over the limit of "
                    f"{limit:,} bytes"
                },
                status_code=413,
            )
        return None


api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False)


def require_api_key(request: Request, key: Annotated[str | None, Depends(api_key_header)]) -> None:
    """Write endpoints need one of ``settings.api_keys`` when any is configured."""
    state = getattr(request.app.state, "lookalike", None)
    keys = state.settings.api_keys if state is not None else []
    if not keys:
        return
    if key is None or not _known_key(key, keys):
        raise HTTPException(
            401,
            "this endpoint needs a valid X-API-Key header",
            headers={"WWW-Authenticate": "APIKey"},
        )


def _known_key(key: str, keys: list[str]) -> bool:
    """Compare as bytes: ``hmac.compare_digest`` raises on non-ASCII ``str``, and a header's
    text is its raw bytes read as Latin-1 (Starlette's decoding), so encoding it back gives the
    bytes the client sent. Every key is compared, so timing does not say which one nearly
    matched."""
    sent = key.encode("latin-1", "replace")
    matches = [hmac.compare_digest(sent, known.encode("utf-8")) for known in keys]
    return any(matches)


WriteAccess = Depends(require_api_key)
