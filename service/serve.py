"""Run the HTTP service: ``python -m lookalike.service.serve`` reads every setting from
``LOOKALIKE_*`` variables. This is the container's entry point, so it imports no torch (the
CLI's ``lookalike serve`` calls the same :func:`run`).

The server's connection limits live here, in :func:`server_config`, which the tests' servers
use too: forwarded headers are believed only from configured proxies (uvicorn believes
127.0.0.1 by default, so a local client could pick its own rate-limit bucket), idle keep-alive
connections close, and a connection that does not finish its headers in time is answered 408
and closed (uvicorn has keep-alive and request timeouts but no header-read timeout).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import sys
from typing import Any

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from .app import create_app, load_state
from .settings import Settings

__all__ = ["run", "server_config", "open_write_refusal", "header_timeout_protocol"]

REQUEST_TIMEOUT_ANSWER = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: 47\r\n\r\n"
    b'{"detail": "the request headers took too long"}'
)


def header_timeout_protocol(
    base: type[asyncio.Protocol], timeout_s: float
) -> type[asyncio.Protocol]:
    """``base`` (uvicorn's h11 or httptools protocol) with a header-read deadline.

    The timer starts when the connection opens and again at the first byte of each next
    request; it stops when the request's headers are complete, which is when uvicorn creates
    the request's ``cycle``. A body that stalls later is the request timeout's business.
    """

    class HeaderTimeoutProtocol(base):  # type: ignore[misc, valid-type]
        _header_timer: asyncio.TimerHandle | None = None
        _seen_cycle: Any = None

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm()  # the first byte of a next request
            super().data_received(data)
            if self.cycle is not None and self.cycle is not self._seen_cycle:
                self._seen_cycle = self.cycle  # headers complete
                self._disarm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._header_timer = asyncio.get_running_loop().call_later(timeout_s, self._expire)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _expire(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.write(REQUEST_TIMEOUT_ANSWER)
                self.transport.close()

    HeaderTimeoutProtocol.__name__ = f"HeaderTimeout{base.__name__}"
    return HeaderTimeoutProtocol


def server_config(app: FastAPI, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """The uvicorn configuration for ``app``: bind address and connection limits."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "http": header_timeout_protocol(AutoHTTPProtocol, settings.header_timeout_s),
        "proxy_headers": bool(settings.forwarded_allow_ips),
        "forwarded_allow_ips": ",".join(settings.forwarded_allow_ips) or "",
        "timeout_keep_alive": settings.keep_alive_timeout_s,
        **overrides,
    }
    return uvicorn.Config(app, **options)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: treat it as reachable from elsewhere
        return False


def open_write_refusal(settings: Settings) -> str | None:
    """Why the service must not start as configured, or None.

    Bound to a loopback address (``make serve``, the local demo) the write routes may be open;
    bound to anything else, as in the container, they need API keys unless
    ``allow_open_writes`` says, explicitly, that anyone who reaches the port may write.
    """
    if settings.api_keys or settings.allow_open_writes or _is_loopback(settings.host):
        return None
    return (
        f"refusing to serve on {settings.host} with open write routes: set "
        "LOOKALIKE_API_KEYS (a JSON list of keys), or LOOKALIKE_ALLOW_OPEN_WRITES=true to let "
        "anyone who reaches the port add and delete items"
    )


def run(settings: Settings) -> None:
    """Load model and index first, so that a bad model or index fails before binding."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    refusal = open_write_refusal(settings)
    if refusal is not None:
        print(f"error: {refusal}", file=sys.stderr)
        raise SystemExit(2)
    state = load_state(settings)
    logging.getLogger(__name__).info(
        "serving %s on http://%s:%d/", settings.index, settings.host, settings.port
    )
    uvicorn.Server(server_config(create_app(settings, state), settings)).run()


if __name__ == "__main__":
    run(Settings())
