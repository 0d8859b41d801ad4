"""The one base class for user-facing evaluation errors, so the CLI can report them in one line."""

from __future__ import annotations

from collections.abc import Sequence

from ..core.errors import InvalidInputError

__all__ = ["EvaluationError", "describe"]


class EvaluationError(InvalidInputError):
    """Input to ranking or evaluation that cannot be used; the message says what to fix."""


def describe(names: Sequence[str], limit: int = 10) -> str:
    """``'a', 'b' and 3 more``: a short list for an error message about many inputs."""
    shown = ", ".join(repr(name) for name in names[:limit])
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return shown + more
