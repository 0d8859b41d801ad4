"""The one root of every error a user can act on.

Each subclass names its *kind*; the service maps kinds to HTTP status codes in one table (the
first kind in an error's MRO wins, so a class that is several things lists its kind first) and
the CLI maps every ``LookalikeError`` to one ``error: ...`` line and exit code 2. Code that
raises picks the subclass that says what went wrong; it never chooses a status code itself.
"""

from __future__ import annotations

__all__ = [
    "LookalikeError",
    "MissingExtraError",
    "BadRequestError",
    "InvalidInputError",
    "NotFoundError",
    "ConflictError",
    "TooLargeError",
    "UnsupportedMediaError",
    "UnavailableError",
]


class LookalikeError(ValueError):
    """Root of the errors users can act on; the message says what to fix.

    It subclasses ``ValueError`` so that code written against the older per-module errors
    (all ``ValueError``) keeps catching them.
    """


class BadRequestError(LookalikeError):
    """A request that is malformed or empty, e.g. an upload of 0 bytes (HTTP 400)."""


class InvalidInputError(LookalikeError):
    """Input that is well-formed enough to read but cannot be used (HTTP 422)."""


class NotFoundError(LookalikeError):
    """Something named by the caller does not exist (HTTP 404)."""


class ConflictError(LookalikeError):
    """The request conflicts with the current state, e.g. a duplicate key (HTTP 409)."""


class TooLargeError(LookalikeError):
    """Input over a configured size limit (HTTP 413)."""


class UnsupportedMediaError(LookalikeError):
    """Input of a kind that is not accepted, e.g. not an allowed image format (HTTP 415)."""


class UnavailableError(LookalikeError):
    """The service cannot answer now (not ready, over budget, timed out) (HTTP 503)."""


class MissingExtraError(LookalikeError):
    """An option that needs an optional extra that is not installed (e.g. ``--ray`` without
    ``lookalike[ray]``): the message says what to install."""
