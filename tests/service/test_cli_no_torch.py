"""The commands that need no PyTorch do not import it: ``--help``, ``index info``, and
``search`` / ``compare`` / the serving app with an exported model or a cached ONNX conversion.

Each case runs in a fresh interpreter (this test process has torch loaded already) and reports
whether ``torch`` ended up in ``sys.modules``.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

import pytest

from lookalike.models.bundle import ModelBundle
from lookalike.models.embedder import Embedder
from lookalike.models.export import export_serving_model

PROBE = """
import contextlib, importlib.abc, io, json, os, sys
blocked = set(json.loads(os.environ.get("PROBE_BLOCKED", "[]")))


class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed)", name=name)
        return None


sys.meta_path.insert(0, Blocked())
args = json.loads(sys.argv[1])
out = io.StringIO()
if args[0] == "app":
    from fastapi.testclient import TestClient
    from lookalike.service.app import create_app
    from lookalike.service.settings import Settings
    settings = Settings(index=args[1], model=args[2], engine="onnx-int8", cache_dir=args[3])
    with TestClient(create_app(settings)) as client:
        ok = client.get("/ready").status_code == 200
        if len(args) > 4:  # also compare and explain two indexed images
            keys = {"key_a": args[4], "key_b": args[5]}
            verdict = client.post("/compare", data=keys)
            answer = client.post("/explain", data=keys)
            ok = ok and verdict.status_code == 200 and answer.status_code == 200
            out.write(json.dumps({"compare": verdict.json(), **answer.json()}))
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


def probe(cache_dir: Path, *args: str, blocked: Sequence[str] = ()) -> dict[str, object]:
    """Run ``args`` in a fresh interpreter in which the modules ``blocked`` cannot be imported
    (as if not installed)."""
    env = {**os.environ, "LOOKALIKE_CACHE_DIR": str(cache_dir),
           "PROBE_BLOCKED": json.dumps(list(blocked))}
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


REPO = Path(__file__).resolve().parents[2]


def _requirement_names(lines: Sequence[str]) -> set[str]:
    names = set()
    for line in lines:
        found = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line.split("#")[0])
        if found:
            names.add(re.sub(r"[-_.]+", "-", found.group(1)).lower())
    return names


def not_in_the_serving_image() -> list[str]:
    """Import names of the project's dependencies that docker/requirements-serve.txt leaves
    out (torch, timm, ...): the serving image does not have them."""
    project = _requirement_names(tomllib.loads((REPO / "pyproject.toml").read_text())[
        "project"]["dependencies"])
    serving = _requirement_names((REPO / "docker" / "requirements-serve.txt").read_text()
                                 .splitlines())
    left_out = project - serving
    return sorted(
        module for module, dists in importlib.metadata.packages_distributions().items()
        if {re.sub(r"[-_.]+", "-", d).lower() for d in dists} & left_out and module.isidentifier()
    )


def test_serving_needs_only_the_serving_images_packages(
    exported: Path, cache_dir: Path, small_store_path: Path, small_image_dir: Path
) -> None:
    """The compose image installs docker/requirements-serve.txt, not the project's
    dependencies. Start-up, /compare (the hubness-corrected verdict reads the cohort) and
    /explain run here with every other dependency unimportable, as in the image."""
    blocked = not_in_the_serving_image()
    assert {"torch", "timm", "typer"} <= set(blocked), blocked
    left, right = (sorted((small_image_dir / side).glob("*.jpg"))[0] for side in ("left", "right"))
    result = probe(cache_dir, "app", str(small_store_path), str(exported), str(cache_dir),
                   f"left/{left.stem}", f"right/{right.stem}", blocked=blocked)
    assert result["code"] == 0, result
    assert json.loads(str(result["out"]))["compare"]["calibration"]["k"] == 20
