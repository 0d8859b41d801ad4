"""Serving models: what `lookalike export` writes, and that a server runs it as shipped.

The export reuses the conversions the engines cached for the session's model, so this costs
seconds when the engine tests ran first (and makes them cheap when it runs first).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lookalike.models.bundle import ModelBundle
from lookalike.models.embedder import Embedder
from lookalike.models.errors import BundleError
from lookalike.models.export import export_serving_model
from lookalike.models.serving import load_serving_model
from lookalike.service.cli import app as cli


@pytest.fixture(scope="module")
def photos(small_image_dir: Path) -> list[Path]:
    return sorted(small_image_dir.rglob("*.jpg"))[:8]


def vectors(embedder: Embedder, photos: list[Path]) -> np.ndarray:
    return np.concatenate([batch.vectors for batch in embedder.embed_files(photos, 8)])


def test_export_ships_the_int8_model_the_default_engine_runs(
    bundle: ModelBundle,
    cache_dir: Path,
    tmp_path: Path,
    photos: list[Path],
    caplog: pytest.LogCaptureFixture,
) -> None:
    serving = export_serving_model(bundle, tmp_path / "serving", cache_dir)
    assert serving.fingerprint == bundle.fingerprint and serving.int8_path is not None
    assert serving.calibration is not None and bundle.calibration is not None
    assert serving.calibration["threshold"] == bundle.calibration["threshold"]
    for name in ("serving.json", "calibration.json"):  # nothing of this machine travels along
        text = (tmp_path / "serving" / name).read_text()
        assert not any(isinstance(v, str) and Path(v).is_absolute()
                       for v in _strings(json.loads(text)))
    with caplog.at_level(logging.INFO, logger="lookalike.models"):
        shipped = Embedder(load_serving_model(tmp_path / "serving"), "onnx-int8")
    assert not any("quantising" in record.getMessage() for record in caplog.records)
    reference = Embedder(bundle, "onnx-int8", cache_dir=cache_dir)
    np.testing.assert_allclose(vectors(shipped, photos), vectors(reference, photos), atol=1e-6)


def test_export_without_int8_quantises_at_start(
    bundle: ModelBundle, cache_dir: Path, tmp_path: Path
) -> None:
    export_serving_model(bundle, tmp_path / "serving", cache_dir)
    plain = export_serving_model(bundle, tmp_path / "serving", cache_dir, int8=False)
    assert plain.int8_path is None and plain.onnx_path.is_file()  # no stale int8 file left


def test_export_command(cache_dir: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli, ["export", "--out", str(tmp_path / "m"), "--cache-dir", str(cache_dir)]
    )
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "m").iterdir()} >= {
        "model.onnx", "model.int8.onnx", "serving.json"
    }


def _strings(value: object) -> list[object]:
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return [value]


@pytest.mark.parametrize("damage", [{"threshold": None}, {"threshold": 3.0}, "drop"])
def test_a_damaged_calibration_fails_when_the_export_loads(
    bundle: ModelBundle, cache_dir: Path, tmp_path: Path, damage: object
) -> None:
    """A calibration.json without a usable threshold is refused at load with a clear
    BundleError (before, an export loaded it unchecked and POST /compare answered 500)."""
    out = tmp_path / "serving"
    export_serving_model(bundle, out, cache_dir, int8=False)
    calibration = json.loads((out / "calibration.json").read_text())
    if damage == "drop":
        del calibration["threshold"]
    else:
        calibration.update(damage)  # type: ignore[call-overload]
    (out / "calibration.json").write_text(json.dumps(calibration))
    with pytest.raises(BundleError, match="calibration.json"):
        load_serving_model(out)
