"""Item metadata: the JSON objects that travel with an image, checked once for every writer.

A metadata object is stored as JSON text in SQLite and returned by every route, so anything
accepted must read back exactly. That rules out what JSON can name but not carry: ``NaN`` and
``Infinity`` (and ``1e400``, which parses to infinity), strings that are not valid UTF-8 (lone
surrogates such as ``"\\ud800"``), integers that other JSON readers cannot hold, and nesting
deep enough to exhaust a recursive encoder. :func:`parse_metadata` reads a caller's text;
:func:`check_metadata` checks an object and returns the canonical text to store. Both raise
:class:`~lookalike.core.errors.InvalidInputError` and never anything else.
"""

from __future__ import annotations

import json
import math
from typing import Any

from .errors import InvalidInputError

__all__ = [
    "MAX_METADATA_BYTES",
    "MAX_METADATA_DEPTH",
    "MetadataError",
    "check_metadata",
    "encode_metadata",
    "parse_metadata",
]

#: Deepest nesting of objects and arrays accepted (the top-level object is depth 1).
MAX_METADATA_DEPTH = 32
#: Largest encoded metadata object (UTF-8 bytes).
MAX_METADATA_BYTES = 64 * 1024
#: Integers must fit a signed 64-bit integer (what SQLite and most JSON readers hold exactly).
_INT_RANGE = (-(2**63), 2**63 - 1)


class MetadataError(InvalidInputError):
    """Metadata that cannot be stored and read back exactly."""


def _reject_constant(name: str) -> float:
    raise MetadataError(f"metadata must not contain {name}: JSON numbers must be finite")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise MetadataError(f"metadata number {text[:40]} is out of range")
    return value


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > 19:
        raise MetadataError("metadata integers must fit in 64 bits")
    return int(text)


def parse_metadata(text: str | bytes) -> dict[str, Any]:
    """Parse a caller's metadata text into a checked object (see :func:`check_metadata`)."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise MetadataError("metadata is not valid UTF-8") from exc
    if len(text.encode("utf-8", "surrogatepass")) > MAX_METADATA_BYTES:
        raise MetadataError(f"metadata is larger than {MAX_METADATA_BYTES} bytes")
    try:
        value = json.loads(
            text,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
            parse_int=_bounded_int,
        )
    except MetadataError:
        raise
    except RecursionError as exc:
        raise MetadataError(f"metadata is nested deeper than {MAX_METADATA_DEPTH} levels") from exc
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise MetadataError(f"metadata is not valid JSON: {exc}") from exc
    check_metadata(value)
    return value


def _check(value: Any, depth: int, where: str) -> None:
    if depth > MAX_METADATA_DEPTH:
        raise MetadataError(f"metadata is nested deeper than {MAX_METADATA_DEPTH} levels")
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int):
        if not _INT_RANGE[0] <= value <= _INT_RANGE[1]:
            raise MetadataError(f"metadata integer at {where} does not fit in 64 bits")
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise MetadataError(f"metadata number at {where} is not finite")
        return
    if isinstance(value, str):
        _check_text(value, where)
        return
    if isinstance(value, list | tuple):
        for index, element in enumerate(value):
            _check(element, depth + 1, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for name, element in value.items():
            if not isinstance(name, str):
                raise MetadataError(f"metadata keys must be strings, got {type(name).__name__}")
            _check_text(name, where)
            _check(element, depth + 1, f"{where}.{name[:40]}")
        return
    raise MetadataError(f"metadata value at {where} is a {type(value).__name__}, not JSON")


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise MetadataError(
            f"metadata text at {where} is not valid Unicode (a lone surrogate?)"
        ) from exc


def check_metadata(value: Any) -> str:
    """Check that ``value`` is a metadata object that reads back exactly; return its JSON text.

    The text is what a store should keep: UTF-8 safe, no ``NaN``, bounded in depth and size.
    """
    if not isinstance(value, dict):
        raise MetadataError("metadata must be a JSON object")
    _check(value, 1, "$")
    text = encode_metadata(value)
    if len(text.encode("utf-8")) > MAX_METADATA_BYTES:
        raise MetadataError(f"metadata is larger than {MAX_METADATA_BYTES} bytes")
    return text


def encode_metadata(value: dict[str, Any]) -> str:
    """Canonical JSON text of checked metadata (compact, non-ASCII kept, finite numbers only)."""
    return json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
