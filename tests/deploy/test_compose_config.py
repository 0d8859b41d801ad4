"""The compose file's secure defaults, checked without a container engine (fast): the API key
is required, write routes are open only when asked for, forwarded headers trusted from nobody.
The service side of the same rule is tested in ``tests/service/test_limits.py``."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from lookalike.service.serve import open_write_refusal
from lookalike.service.settings import Settings

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"
DOCKERFILE = COMPOSE.parent / "docker" / "Dockerfile"


def api_environment() -> dict[str, str]:
    return yaml.safe_load(COMPOSE.read_text())["services"]["api"]["environment"]


def test_compose_requires_an_api_key() -> None:
    keys = api_environment()["LOOKALIKE_API_KEYS"]
    assert re.fullmatch(r"\$\{LOOKALIKE_API_KEYS:\?.+\}", keys), keys  # unset or empty: refused


def test_compose_opens_nothing_by_default() -> None:
    env = api_environment()
    assert env["LOOKALIKE_ALLOW_OPEN_WRITES"] == "${LOOKALIKE_ALLOW_OPEN_WRITES:-false}"
    assert env["LOOKALIKE_FORWARDED_ALLOW_IPS"] == "${LOOKALIKE_FORWARDED_ALLOW_IPS:-[]}"


def test_the_container_binds_all_interfaces_so_its_service_demands_a_key() -> None:
    """The image's own settings (LOOKALIKE_HOST=0.0.0.0) fall under the service's rule."""
    assert "LOOKALIKE_HOST=0.0.0.0" in DOCKERFILE.read_text()
    assert open_write_refusal(Settings(host="0.0.0.0", api_keys=[])) is not None
