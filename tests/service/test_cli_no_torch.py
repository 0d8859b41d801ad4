"""The commands that need no PyTorch do not import it: ``--help``, ``index info``, and
``search`` / ``compare`` / the serving app with an exported model or a cached ONNX conversion.

Each case runs in a fresh interpreter (this test process has torch loaded already) and reports
whether ``torch`` ended up in ``sys.modules``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lookalike.models.bundle import ModelBundle
from lookalike.models.embedder import Embedder
from lookalike.models.export import export_serving_model

PROBE = """
import contextlib, io, json, sys
args = json.loads(sys.argv[1])
out = io.StringIO()
if args[0] == "app":
    from fastapi.testclient import TestClient
    from lookalike.service.app import create_app
    from lookalike.service.settings import Settings
    settings = Settings(index=args[1], model=args[2], engine="onnx-int8", cache_dir=args[3])
    with TestClient(create_app(settings)) as client:
        ok = client.get("/ready").status_code == 200
        if len(args) > 4:  # also explain two indexed images
            answer = client.post("/explain", data={"key_a": args[4], "key_b": args[5]})
            ok = ok and answer.status_code == 200
            out.write(answer.text)
    code = 0 if ok else 1
else:
    from lookalike.service.cli import app
    with contextlib.redirect_stdout(out):
        try:
            app(args, prog_name="lookalike")
            code = 0
        except SystemExit as exc:
            code = exc.code or 0
print(json.dumps({"code": code, "torch": "torch" in sys.modules, "out": out.getvalue()}))
"""


def probe(cache_dir: Path, *args: str) -> dict[str, object]:
    env = {**os.environ, "LOOKALIKE_CACHE_DIR": str(cache_dir)}
    env.pop("LOOKALIKE_MODEL", None)
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(list(args))],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def exported(
    bundle: ModelBundle, cache_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The default model exported (reusing the session's cached conversions), and its int8
    conversion cached for the bundle itself too."""
    Embedder(bundle, "onnx-int8", cache_dir=cache_dir)
    out = tmp_path_factory.mktemp("export") / "serving"
    export_serving_model(bundle, out, cache_dir)
    return out


def test_help_imports_no_torch(cache_dir: Path) -> None:
    result = probe(cache_dir, "--help")
    assert result["code"] == 0 and "index" in str(result["out"])
    assert result["torch"] is False


def test_index_info_imports_no_torch(cache_dir: Path, small_store_path: Path) -> None:
    result = probe(cache_dir, "index", "info", str(small_store_path))
    assert result["code"] == 0 and "model_fingerprint" in str(result["out"])
    assert result["torch"] is False


@pytest.mark.parametrize("model", ["export", "cached-bundle"])
def test_search_imports_no_torch(
    model: str, exported: Path, cache_dir: Path, small_store_path: Path, small_image_dir: Path
) -> None:
    image = sorted((small_image_dir / "left").glob("*.jpg"))[0]
    chosen = ["--model", str(exported)] if model == "export" else []
    result = probe(cache_dir, "search", str(image), "--index", str(small_store_path),
                   "--json", "-k", "1", *chosen)
    assert result["code"] == 0
    (match,) = json.loads(str(result["out"]))
    assert match["key"] == f"left/{image.stem}" and match["score"] > 0.99
    assert result["torch"] is False


def test_serving_app_imports_no_torch(
    exported: Path, cache_dir: Path, small_store_path: Path
) -> None:
    result = probe(cache_dir, "app", str(small_store_path), str(exported), str(cache_dir))
    assert result["code"] == 0
    assert result["torch"] is False


def test_explain_imports_no_torch(
    exported: Path, cache_dir: Path, small_store_path: Path, small_image_dir: Path,
    tmp_path: Path,
) -> None:
    """The export carries explain.onnx: the CLI and the app explain exactly without torch."""
    left, right = (sorted((small_image_dir / side).glob("*.jpg"))[0] for side in ("left", "right"))
    picture = tmp_path / "pair.png"
    result = probe(cache_dir, "explain", str(left), str(right), "--model", str(exported),
                   "--json", "--out", str(picture))
    assert result["code"] == 0 and result["torch"] is False
    explanation = json.loads(str(result["out"]))
    assert explanation["method"] == "exact" and explanation["engine"] == "onnx"
    total = explanation["constant"] + sum(map(sum, explanation["query_map"])) + sum(
        map(sum, explanation["match_map"]))
    assert abs(total - explanation["score"]) < 1e-4
    assert picture.stat().st_size > 10_000
    result = probe(cache_dir, "app", str(small_store_path), str(exported), str(cache_dir),
                   f"left/{left.stem}", f"right/{right.stem}")
    assert result["code"] == 0 and result["torch"] is False
    answer = json.loads(str(result["out"]))["explanation"]
    assert answer["method"] == "exact" and answer["engine"] == "onnx"


def test_compare_imports_no_torch(
    exported: Path, cache_dir: Path, small_image_dir: Path
) -> None:
    """The export carries the cohort and the calibration's hubness entry: the torch-free
    verdict is the hubness-corrected one."""
    left, right = (sorted((small_image_dir / side).glob("*.jpg"))[0] for side in ("left", "right"))
    result = probe(cache_dir, "compare", str(left), str(right), "--model", str(exported),
                   "--json")
    assert result["code"] == 0 and result["torch"] is False
    verdict = json.loads(str(result["out"]))
    assert verdict["calibration"]["k"] == 20 and verdict["calibrated"] is True
    assert verdict["verdict_score"] < verdict["score"]  # minus two positive hubness halves
