"""`lookalike compare`: the verdict POST /compare gives (one rule, models.verdict), on real
demo images, plain and re-ranked; its user errors are one line and exit code 2."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import Result

from lookalike.models.embedder import Embedder
from lookalike.models.rerank import reranker_for
from lookalike.models.resolve import resolve_model
from lookalike.models.verdict import reranked_verdict


def _pair(demo_dir: Path, demo_pairs: list[tuple[str, str]]) -> list[Path]:
    left, right = demo_pairs[0]
    return [demo_dir / "left" / f"{left}.jpg", demo_dir / "right" / f"{right}.jpg"]


def test_the_cli_verdict_is_the_services(
    run: Callable[..., Result], client: TestClient, embedder: Embedder, demo_dir: Path,
    demo_pairs: list[tuple[str, str]]
) -> None:
    paths = _pair(demo_dir, demo_pairs)
    result = run("compare", *paths, "--json", "--engine", embedder.engine_name)
    assert result.exit_code == 0, result.output
    cli = json.loads(result.output)
    files = {f"image_{side}": (p.name, p.read_bytes(), "image/jpeg")
             for side, p in zip("ab", paths, strict=True)}
    http = client.post("/compare", files=files).json()
    for field in ("score", "verdict_score", "threshold"):
        assert cli[field] == pytest.approx(http[field], abs=1e-3), field
    assert cli["same"] is http["same"] and cli["calibrated"] is http["calibrated"] is True
    assert cli["engine"] == embedder.engine_name
    assert cli["calibration"]["k"] == http["calibration"]["k"] == 20
    text = run("compare", *paths, "--engine", embedder.engine_name)
    assert text.exit_code == 0
    verdict = "same" if cli["same"] else "different"
    assert text.output.startswith(f"{verdict}: verdict score {cli['verdict_score']:.4f}")


def test_rerank_judges_the_rerankers_pair_score(
    run: Callable[..., Result], cache_dir: Path, demo_dir: Path,
    demo_pairs: list[tuple[str, str]]
) -> None:
    paths = _pair(demo_dir, demo_pairs)
    result = run("compare", *paths, "--model", "accurate", "--engine", "torch", "--rerank",
                 "--json")
    assert result.exit_code == 0, result.output
    cli = json.loads(result.output)
    embedder = Embedder(resolve_model("accurate", cache_dir), "torch")
    reranker = reranker_for(embedder, cache_dir)
    images = np.stack([embedder.load_file(p)[0] for p in paths])
    expected = reranked_verdict(reranker, *reranker.describe(images))
    assert cli["verdict_score"] == cli["rerank_score"] == pytest.approx(expected.verdict_score,
                                                                        abs=1e-4)
    assert cli["threshold"] == expected.threshold and cli["same"] is expected.same


@pytest.mark.parametrize(("args", "message"), [
    (["README"], "README.md: not an image"),
    (["missing"], "cannot read"),
    (["--rerank"], "no measured re-ranker"),
])
def test_user_errors_are_one_line_and_exit_2(
    run: Callable[..., Result], demo_dir: Path, demo_pairs: list[tuple[str, str]],
    tmp_path: Path, args: list[str], message: str
) -> None:
    first, second = _pair(demo_dir, demo_pairs)
    if args == ["README"]:
        args = [str(Path(__file__).parents[2] / "README.md")]
    elif args == ["missing"]:
        args = [str(tmp_path / "missing.jpg")]
    else:
        args = [str(second), *args]
    result = run("compare", first, *args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines
