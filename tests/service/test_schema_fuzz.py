"""schemathesis against the OpenAPI schema of a real server: no request may produce a 5xx.

The operations are driven through Hypothesis directly (schemathesis' pytest plugin does not
load under this pytest version); each operation gets the same bounded number of examples.
"""

from __future__ import annotations

from urllib.parse import quote

import httpx
import pytest
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


STATEFUL_STEPS = 6
STATEFUL_EXAMPLES = 12  # about 30 s here; the slow run below takes ten times as many


def _stateful(server: str, query_jpeg: tuple[str, bytes], examples: int) -> None:
    """Sequences of calls that follow the schema's links from ``POST /items`` to
    ``GET /items/{key}``, ``GET /thumbnails/{key}``, ``POST /match`` and
    ``DELETE /items/{key}``, with generated keys and metadata; every upload is a real image so
    that adds succeed and the links have something to follow. No step may answer a 5xx."""
    schema = schemathesis.openapi.from_url(f"{server}/openapi.json")
    image = query_jpeg[1]
    calls: list[str] = []  # every call's operation and status, across scenarios

    class Machine(schema.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            self.added: list[str] = []

        def before_call(self, case: schemathesis.Case) -> None:
            if isinstance(case.body, dict) and "image" in case.body:
                case.body["image"] = image

        def after_call(self, response, case: schemathesis.Case) -> None:
            calls.append(f"{case.operation.label} {response.status_code}")
            if case.operation.label == "POST /items" and response.status_code == 201:
                self.added.append(response.json()["key"])

        def teardown(self) -> None:
            """Each scenario starts from the same index, so that a replayed scenario meets
            the same answers (Hypothesis replays them to shrink a failure)."""
            for key in self.added:
                httpx.delete(f"{server}/items/{quote(key, safe='')}")

        def validate_response(self, response, case, additional_checks=None, **kwargs) -> None:
            case.validate_response(response, checks=[not_a_server_error])

    Machine.run(
        settings=settings(
            max_examples=examples,
            stateful_step_count=STATEFUL_STEPS,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
    )
    followed = {call.rsplit(" ", 1)[0] for call in calls[1:]}
    assert "POST /items 201" in calls, calls  # adds succeed, so the links have keys to follow
    assert {"GET /items/{key}", "GET /thumbnails/{key}", "DELETE /items/{key}"} <= followed


def test_stateful_links_produce_no_server_errors(
    server: str, query_jpeg: tuple[str, bytes]
) -> None:
    _stateful(server, query_jpeg, STATEFUL_EXAMPLES)


@pytest.mark.slow
def test_stateful_links_produce_no_server_errors_at_length(
    server: str, query_jpeg: tuple[str, bytes]
) -> None:
    _stateful(server, query_jpeg, 10 * STATEFUL_EXAMPLES)
