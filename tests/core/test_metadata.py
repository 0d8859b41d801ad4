import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lookalike.core.errors import InvalidInputError
from lookalike.core.metadata import (
    MAX_METADATA_DEPTH,
    check_metadata,
    parse_metadata,
)

BAD_TEXTS = [
    '{"a": NaN}',
    '{"a": Infinity}',
    '{"a": -Infinity}',
    '{"a": 1e400}',
    '{"a": "\\ud800"}',
    '{"\\udfff": 1}',
    '{"a": ' + "9" * 5000 + "}",
    '{"a": 9223372036854775808}',
    "[" * 50_000 + "]" * 50_000,
    '{"a": ' + "[" * (MAX_METADATA_DEPTH + 1) + "]" * (MAX_METADATA_DEPTH + 1) + "}",
    "[1, 2]",
    '"text"',
    "{",
    b"\xff\xfe",
]


@pytest.mark.parametrize("text", BAD_TEXTS, ids=range(len(BAD_TEXTS)))
def test_unstorable_metadata_is_refused_with_the_one_error_type(text):
    with pytest.raises(InvalidInputError):
        parse_metadata(text)


def test_objects_that_cannot_round_trip_are_refused():
    for value in [{"a": float("nan")}, {"a": "\ud800"}, {1: 2}, {"a": {1, 2}}, {"a": 2**64}]:
        with pytest.raises(InvalidInputError):
            check_metadata(value)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(), children, max_size=4)
    ),
    max_leaves=20,
)


@given(st.dictionaries(st.text(), json_values, max_size=5))
def test_every_accepted_object_reads_back_exactly(value):
    try:
        text = check_metadata(value)
    except InvalidInputError:
        return  # lone surrogates from st.text(); refused, never stored
    assert json.loads(text) == value
    assert parse_metadata(text) == value
    text.encode("utf-8")
