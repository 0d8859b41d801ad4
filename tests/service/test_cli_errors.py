"""Error kinds are mapped once: to HTTP status codes (``service/app.py``) and to the CLI's
exit code 2 with one ``error:`` line (``service/cli.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from lookalike.core import errors
from lookalike.core.pairs import PairsError
from lookalike.evaluation.errors import EvaluationError
from lookalike.index.build import SourceError
from lookalike.index.store import UnknownKeyError
from lookalike.models.errors import BackboneError, BundleError, ConfigError, EngineError
from lookalike.models.preprocess import ImageTooLargeError, UnsupportedImageError
from lookalike.service.app import status_for
from lookalike.service.cli import app

KINDS = {
    errors.InvalidInputError: 422,
    errors.NotFoundError: 404,
    errors.ConflictError: 409,
    errors.TooLargeError: 413,
    errors.UnsupportedMediaError: 415,
    errors.UnavailableError: 503,
}


@pytest.mark.parametrize("kind", sorted(KINDS, key=lambda k: k.__name__))
def test_every_kind_has_its_status(kind: type[Exception]) -> None:
    subclass = type("Specific", (kind,), {})  # a module's own subclass inherits the kind
    assert status_for(kind("x")) == status_for(subclass("x")) == KINDS[kind]


@pytest.mark.parametrize(
    "error", [BundleError, ConfigError, BackboneError, EngineError, EvaluationError, PairsError,
              SourceError],
)
def test_user_errors_are_lookalike_errors(error: type[Exception]) -> None:
    assert issubclass(error, errors.LookalikeError)
    assert status_for(error("x")) == 422


def test_other_roots_keep_their_codes() -> None:
    assert status_for(UnknownKeyError("k")) == 404
    assert status_for(ImageTooLargeError("big")) == 413
    assert status_for(UnsupportedImageError("svg")) == 415


def test_cli_maps_user_errors_to_exit_code_2(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["search", str(tmp_path / "none.jpg"), "--index",
                                      str(tmp_path / "no-index"), "--model", "no-such-model"])
    assert result.exit_code == 2
    assert result.output.startswith("error: 'no-such-model' is neither")
