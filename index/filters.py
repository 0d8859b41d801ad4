"""Metadata filters: one small typed spec, validated once, used by the store, the API and the CLI.

A filter is a list of conditions that must all hold (AND). Each condition names a top-level
metadata field, or ``added`` (the time the item was added, which the store records), an
operator and a value:

- equality: ``{"album": "holiday"}`` or ``album=holiday``;
- one of several values: ``{"album": {"in": ["holiday", "work"]}}`` or ``album in holiday,work``;
- numeric range: ``{"year": {"gte": 2020, "lt": 2024}}`` or ``year>=2020`` and ``year<2024``;
- added time: ``{"added": {"gte": "2026-11-25"}}``, ``added>=2026-11-25`` or, for "this week",
  ``added>=-7d`` (ISO 8601 dates and times are UTC unless they say otherwise; ``-7d``,
  ``-24h``, ``-30m`` are relative to now; plain numbers are Unix seconds).

Equality is typed, as in JSON: ``year=2020`` matches the number 2020, not the string
``"2020"`` (write ``year="2020"`` for that); ranges match only numbers. The same spec comes
from a JSON object (``Filter.parse``, the API) or ``field OP value`` expressions
(``Filter.from_expressions``, the CLI's ``--where``), and compiles to one SQL condition over
the store's item table (:meth:`Filter.sql`), so there is exactly one meaning of a filter.
Bad filters raise :class:`FilterError` (HTTP 422, CLI exit 2) with a message that says why.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from lookalike.core.errors import InvalidInputError

__all__ = ["ADDED", "Condition", "Filter", "FilterError", "OPERATORS"]

#: The field that means "when the item was added" rather than a metadata field.
ADDED = "added"
#: Operators of the JSON form, and what each compiles to.
OPERATORS = {"eq": "=", "in": "IN", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
RANGE_OPERATORS = ("gt", "gte", "lt", "lte")
#: ``field OP value`` expressions of the CLI, longest operator first so ``>=`` wins over ``>``.
_EXPRESSION = re.compile(
    r"^\s*(?P<field>[^=<>!\s]+?)\s*(?P<op>>=|<=|==|=|>|<|\s+in\s+)\s*(?P<value>.*?)\s*$"
)
_EXPRESSION_OPS = {"=": "eq", "==": "eq", ">": "gt", ">=": "gte", "<": "lt", "<=": "lte"}
_RELATIVE = re.compile(r"^-(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_CONDITIONS = 32
MAX_IN_VALUES = 1000
MAX_FIELD_LENGTH = 200

Scalar = str | int | float | bool | None


class FilterError(InvalidInputError):
    """A filter that cannot be used; the message names the condition and what is wrong."""


@dataclass(frozen=True)
class Condition:
    """``field op value``; ``value`` is a tuple for ``in``, a number for range operators."""

    field: str
    op: str
    value: Any

    def sql(self) -> tuple[str, list[Any]]:
        """This condition as SQL over the ``items`` table, with its parameters."""
        if self.field == ADDED:
            if self.op == "in":
                return f"added IN ({','.join('?' * len(self.value))})", list(self.value)
            return f"added {OPERATORS[self.op]} ?", [self.value]
        path = '$."' + self.field + '"'
        # Each json_* call parses the row's JSON again (SQLite < 3.45 keeps no parse cache),
        # so the value is compared first and its JSON type checked only where that passed
        # (SQLite stops an AND at the first false): one parse for most rows.
        if self.op in RANGE_OPERATORS:
            return (f"(json_extract(metadata, ?) {OPERATORS[self.op]} ? "
                    "AND json_type(metadata, ?) IN ('integer', 'real'))",
                    [path, self.value, path])
        values = self.value if self.op == "in" else (self.value,)
        parts, params = [], []
        for value in values:
            if value is None or isinstance(value, bool):  # matched by JSON type alone
                parts.append("json_type(metadata, ?) = ?")
                params += [path, "null" if value is None else str(value).lower()]
            elif isinstance(value, str):  # SQL text equals only text: no type check needed
                parts.append("json_extract(metadata, ?) = ?")
                params += [path, value]
            else:  # a number: true/false read back as 1/0, so the type is checked too
                parts.append("(json_extract(metadata, ?) = ? "
                             "AND json_type(metadata, ?) IN ('integer', 'real'))")
                params += [path, value, path]
        return "(" + " OR ".join(parts) + ")", params

    def matches(self, metadata: Mapping[str, Any], added: float) -> bool:
        """Whether an item passes, in Python: the reference the SQL is tested against."""
        if self.field == ADDED:
            value: Any = added
        elif self.field in metadata:
            value = metadata[self.field]
        else:
            return False
        if self.op in RANGE_OPERATORS:
            if isinstance(value, bool) or not isinstance(value, int | float):
                return False
            return {"gt": value > self.value, "gte": value >= self.value,
                    "lt": value < self.value, "lte": value <= self.value}[self.op]
        wanted = self.value if self.op == "in" else (self.value,)
        return any(_same_json(value, w) for w in wanted)


@dataclass(frozen=True)
class Filter:
    """Conditions that must all hold; the empty filter lets everything through."""

    conditions: tuple[Condition, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.conditions)

    @classmethod
    def parse(cls, spec: Filter | Mapping[str, Any] | str | None) -> Filter:
        """A filter from its JSON form (an object, or its text), checked once, here."""
        if spec is None or isinstance(spec, Filter):
            return spec or cls()
        if isinstance(spec, str | bytes):
            if not spec.strip():
                return cls()
            try:
                spec = json.loads(spec)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise FilterError(f"filter: not valid JSON ({exc})") from exc
        if not isinstance(spec, Mapping):
            raise FilterError('filter: expected a JSON object such as {"album": "holiday", '
                              '"year": {"gte": 2020}}')
        conditions: list[Condition] = []
        for name, rule in spec.items():
            field = _field(name)
            if isinstance(rule, Mapping):
                if not rule:
                    raise FilterError(f"filter {field!r}: an empty object has no operator; use "
                                      f"one of {', '.join(OPERATORS)}")
                for op, value in rule.items():
                    conditions.append(_condition(field, op, value))
            else:
                conditions.append(_condition(field, "eq", rule))
        return cls._checked(conditions)

    @classmethod
    def from_expressions(cls, expressions: Sequence[str]) -> Filter:
        """A filter from ``field OP value`` expressions (the CLI's ``--where``), ANDed.

        ``OP`` is ``=``, ``>``, ``>=``, ``<``, ``<=`` or `` in `` (comma-separated values);
        a value reads as JSON when it can (``2020``, ``true``, ``"2020"``), else as text.
        """
        conditions = []
        for expression in expressions:
            found = _EXPRESSION.match(expression)
            if found is None or not found["value"] or found["value"][0] in "=<>!":
                raise FilterError(
                    f"--where {expression!r}: expected FIELD=VALUE, FIELD>=NUMBER (or >, <, <=) "
                    "or 'FIELD in V1,V2', e.g. album=holiday, 'year>=2020', 'added>=-7d'"
                )
            op = found["op"].strip()
            field = _field(found["field"])
            if op == "in":
                values = [_scalar_text(part.strip()) for part in found["value"].split(",")]
                conditions.append(_condition(field, "in", values))
            else:
                conditions.append(_condition(field, _EXPRESSION_OPS[op],
                                             _scalar_text(found["value"])))
        return cls._checked(conditions)

    @classmethod
    def _checked(cls, conditions: list[Condition]) -> Filter:
        if len(conditions) > MAX_CONDITIONS:
            raise FilterError(f"filter: {len(conditions)} conditions; the limit is "
                              f"{MAX_CONDITIONS}")
        return cls(tuple(conditions))

    def sql(self) -> tuple[str, list[Any]]:
        """One SQL condition (AND of the conditions) and its parameters; ``1`` when empty."""
        if not self.conditions:
            return "1", []
        parts, params = [], []
        for condition in self.conditions:
            text, values = condition.sql()
            parts.append(text)
            params += values
        return " AND ".join(parts), params

    def matches(self, metadata: Mapping[str, Any], added: float) -> bool:
        return all(c.matches(metadata, added) for c in self.conditions)

    def to_json(self) -> dict[str, Any]:
        """The JSON form (what :meth:`parse` reads back to an equal filter)."""
        out: dict[str, dict[str, Any]] = {}
        for c in self.conditions:
            out.setdefault(c.field, {})[c.op] = list(c.value) if c.op == "in" else c.value
        return out


def _field(name: Any) -> str:
    if not isinstance(name, str) or not name or len(name) > MAX_FIELD_LENGTH:
        raise FilterError(f"filter: field names are 1-{MAX_FIELD_LENGTH} characters, got "
                          f"{name!r}"[:300])
    if any(ch in name for ch in '"\\') or not name.isprintable():
        raise FilterError(f"filter: field {name!r} has a quote, backslash or control character")
    return name


def _condition(field: str, op: Any, value: Any) -> Condition:
    if op not in OPERATORS:
        raise FilterError(f"filter {field!r}: unknown operator {op!r}; use one of "
                          f"{', '.join(OPERATORS)}")
    if op == "in":
        if not isinstance(value, list | tuple) or not value:
            raise FilterError(f"filter {field!r}: 'in' takes a non-empty list of values")
        if len(value) > MAX_IN_VALUES:
            raise FilterError(f"filter {field!r}: 'in' takes at most {MAX_IN_VALUES} values")
        return Condition(field, op, tuple(_value(field, op, v) for v in value))
    return Condition(field, op, _value(field, op, value))


def _value(field: str, op: str, value: Any) -> Scalar:
    if field == ADDED:
        return _timestamp(value)
    if op in RANGE_OPERATORS:
        if not _finite_number(value):
            raise FilterError(f"filter {field!r}: '{op}' compares numbers, got {value!r}")
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise FilterError(f"filter {field!r}: {value!r} is not a value metadata can hold")
    if isinstance(value, int) and not isinstance(value, bool) and not -2**63 <= value < 2**63:
        raise FilterError(f"filter {field!r}: {value} is beyond 64-bit integers")
    if value is not None and not isinstance(value, str | int | float | bool):
        raise FilterError(f"filter {field!r}: compare with a string, number, true, false or "
                          f"null, not {type(value).__name__}")
    return value


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _timestamp(value: Any) -> float:
    """Unix seconds from a number, an ISO 8601 date/time (UTC unless zoned) or ``-7d``."""
    if _finite_number(value):
        return float(value)
    if isinstance(value, str):
        relative = _RELATIVE.match(value.strip())
        if relative:
            return time.time() - float(relative[1]) * _UNIT_SECONDS[relative[2]]
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            pass
        else:
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            return moment.timestamp()
    raise FilterError(f"filter {ADDED!r}: expected an ISO date or time (2026-11-25, "
                      f"2026-11-25T08:00:00+01:00), Unix seconds, or -7d/-24h/-30m, "
                      f"got {value!r}"[:300])


def _scalar_text(text: str) -> Scalar:
    """A ``--where`` value: JSON when it reads as a JSON scalar, else the text itself."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    return value if value is None or isinstance(value, str | int | float | bool) else text


def _same_json(a: Any, b: Scalar) -> bool:
    """JSON equality: ``1 == 1.0`` but ``true != 1`` and ``"1" != 1``."""
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    return isinstance(a, str) and isinstance(b, str) and a == b
