"""schemathesis against the OpenAPI schema of a real server: no request may produce a 5xx.

The operations are driven through Hypothesis directly (schemathesis' pytest plugin does not
load under this pytest version); each operation gets the same bounded number of examples.
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

EXAMPLES_PER_OPERATION = 25


def test_no_server_errors(server: str) -> None:
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    checked = []
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(checks=[not_a_server_error])

        check()
        checked.append(operation.label)
    assert "POST /match" in checked and "GET /items" in checked
