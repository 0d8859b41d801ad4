"""Each training setting's allowed values are declared on its field: the one generic check
refuses a value just outside them (both ends), and the CLI help states them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from lookalike.models.train_config import Bounds, TrainConfig, TrainConfigError, cli_fields

BOUNDED = [f for f in dataclasses.fields(TrainConfig) if f.metadata.get("bounds") is not None]


def outside(bounds: Bounds) -> list[Any]:
    """Values just past each end of ``bounds`` (or a choice it lacks)."""
    if bounds.choices:
        return ["nowhere"]
    values = []
    if bounds.low is not None:
        values.append(bounds.low if bounds.low_open else bounds.low - 1)
    if bounds.high is not None:
        values.append(bounds.high if bounds.high_open else bounds.high + 0.5)
    return [*values, "ten"]  # text where a number belongs


def test_the_checked_settings_are_declared() -> None:
    assert {f.name for f in BOUNDED} >= {"epochs", "batch_size", "lr", "warmup", "crop_scale",
                                         "flip", "views", "hard_neighbours", "device"}


@pytest.mark.parametrize("field", BOUNDED, ids=lambda f: f.name)
def test_a_value_outside_the_bounds_is_refused(field: dataclasses.Field, tmp_path: Path) -> None:
    bounds = field.metadata["bounds"]
    default = TrainConfig(pairs=tmp_path / "pairs.csv", out=tmp_path / "model")
    assert bounds.allows(getattr(default, field.name))
    for value in outside(bounds):
        config = dataclasses.replace(default, **{field.name: value})
        with pytest.raises(TrainConfigError, match=f"^{field.name} must be .*, got {value}$"):
            config.validate()


@pytest.mark.parametrize(
    ("bounds", "text", "inside", "outside"),
    [
        (Bounds(2), ">= 2", [2, 3.5], [1.9]),
        (Bounds(0, low_open=True), "> 0", [1e-9], [0, -1]),
        (Bounds(0, 1, high_open=True), "in [0, 1)", [0, 0.99], [1, -0.1]),
        (Bounds(0, 1, low_open=True), "in (0, 1]", [1, 0.5], [0, 1.01]),
        (Bounds(choices=("cpu", "cuda")), "one of cpu, cuda", ["cpu"], ["tpu", 1]),
    ],
)
def test_bounds_read_as_they_check(
    bounds: Bounds, text: str, inside: list[Any], outside: list[Any]
) -> None:
    assert str(bounds) == text
    assert all(bounds.allows(value) for value in inside)
    assert not any(bounds.allows(value) for value in outside)


def test_the_help_states_the_allowed_values_and_the_default() -> None:
    helps = {field.name: field.help for field in cli_fields()}
    assert helps["warmup"].endswith("(allowed: in [0, 1); default: 0.1)")
    assert helps["device"].endswith("(allowed: one of auto, cpu, cuda; default: auto)")
    assert helps["seed"].endswith("(default: 0)")
