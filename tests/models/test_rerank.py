"""The shipped re-ranker (issue 14): MaxSim against a plain loop; descriptions that are the
model's own embedding and unit learned regions; scores that are the cosine plus the measured
weight times MaxSim (both ways, each side's regions by its own weights, for a pair);
`lookalike rank --rerank` end to end on real demo images; and clear errors for a model without
one, one measured for the old regions or the old pair score, or a damaged entry."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lookalike.models.embedder import Embedder
from lookalike.models.errors import BundleError, EngineError
from lookalike.models.model import CALIBRATION_FILE, RERANK_KEY
from lookalike.models.rerank import REGIONS, Reranker, RerankSpec, maxsim, reranker_for
from lookalike.models.resolve import resolve_model
from lookalike.service.cli import app


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def test_maxsim_is_the_mean_best_region_cosine() -> None:
    rng = np.random.default_rng(0)
    query, candidates = _unit(rng.normal(size=(4, 6))), _unit(rng.normal(size=(3, 5, 6)))
    for symmetric in (False, True):
        expected = []
        for candidate in candidates:
            forward = np.mean([max(q @ c for c in candidate) for q in query])
            back = np.mean([max(q @ c for q in query) for c in candidate])
            expected.append((forward + back) / 2 if symmetric else forward)
        np.testing.assert_allclose(maxsim(query, candidates, symmetric), expected)


def test_symmetric_maxsim_weighs_each_sides_regions_by_its_own_weights() -> None:
    """The pair score's MaxSim: the query's best matches weighted by its weights, averaged with
    each candidate region's best match weighted by the candidate's."""
    rng = np.random.default_rng(1)
    query, candidates = _unit(rng.normal(size=(4, 6))), _unit(rng.normal(size=(3, 5, 6)))
    weights, candidate_weights = rng.dirichlet(np.ones(4)), rng.dirichlet(np.ones(5), size=3)
    expected = []
    for candidate, back_weights in zip(candidates, candidate_weights, strict=True):
        forward = sum(w * max(q @ c for c in candidate) for q, w in zip(query, weights,
                                                                          strict=True))
        back = sum(w * max(q @ c for q in query) for c, w in zip(candidate, back_weights,
                                                                   strict=True))
        expected.append((forward + back) / 2)
    np.testing.assert_allclose(maxsim(query, candidates, True, weights, candidate_weights),
                               expected)


@pytest.fixture(scope="module")
def accurate(cache_dir: Path) -> Embedder:
    return Embedder(resolve_model("accurate", cache_dir))


@pytest.fixture(scope="module")
def reranker(accurate: Embedder, cache_dir: Path) -> Reranker:
    return reranker_for(accurate, cache_dir)


def _batch(embedder: Embedder, demo_dir: Path, demo_pairs: list[tuple[str, str]]) -> np.ndarray:
    paths = [demo_dir / side / f"{name}.jpg" for pair in demo_pairs[:3]
             for side, name in zip(("left", "right"), pair, strict=True)]
    return np.stack([embedder.load_file(path)[0] for path in paths])


def test_the_accurate_model_ships_its_measured_reranker(accurate: Embedder) -> None:
    entry = accurate.bundle.calibration[RERANK_KEY]
    assert RerankSpec.of(accurate).weight == entry["weight"] > 0
    assert entry["regions"] == REGIONS
    assert entry["top1_gain"] - 2 * entry["top1_gain_se"] > 0, "measured gain, out of fold"


def test_descriptions_are_the_embedding_and_unit_regions(
    accurate: Embedder, reranker: Reranker, demo_dir: Path, demo_pairs: list[tuple[str, str]]
) -> None:
    """The first part is the model's own embedding (the same engine's); each region vector
    has unit length."""
    batch = _batch(accurate, demo_dir, demo_pairs)
    described = reranker.describe(batch)
    layout = reranker.layout
    assert described.shape == (len(batch), layout.width) and layout.regions == 49
    dim = accurate.dim
    np.testing.assert_allclose(described[:, :dim], accurate.embed_arrays(batch), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(reranker.regions(described), axis=-1), 1.0,
                               atol=1e-5)
    assert reranker.describe(batch[:0]).shape == (0, layout.width)


def test_scores_add_the_weighted_maxsim_to_the_cosine(
    accurate: Embedder, reranker: Reranker, demo_dir: Path, demo_pairs: list[tuple[str, str]]
) -> None:
    described = reranker.describe(_batch(accurate, demo_dir, demo_pairs))
    query, candidates = described[0], described[1:]
    regions, dim = reranker.regions(described), accurate.dim
    weights = reranker.weights(query)  # the shipped map weighs the query's regions
    assert reranker.layout.weighted and weights.sum() == pytest.approx(1.0, abs=1e-5)
    expected = [candidate[:dim] @ query[:dim] + reranker.spec.weight * sum(
        w * max(q @ r for r in mine) for q, w in zip(regions[0], weights, strict=True))
        for candidate, mine in zip(candidates, regions[1:], strict=True)]
    np.testing.assert_allclose(reranker.scores(query, candidates), expected, atol=1e-5)
    assert reranker.scores(query, candidates[:0]).shape == (0,)


def test_a_model_without_a_reranker_says_so(embedder: Embedder) -> None:
    with pytest.raises(EngineError, match="no measured re-ranker.*--model accurate"):
        RerankSpec.of(embedder)


def test_an_entry_for_the_old_regions_asks_to_measure_again(
    tmp_path: Path, cache_dir: Path
) -> None:
    """The explain-7x7 re-ranker of earlier versions is gone: its entry gets a clear error
    naming the command that measures the learned one, not a wrong score."""
    copy = tmp_path / "accurate"
    shutil.copytree(resolve_model("accurate", cache_dir).path, copy)
    calibration = json.loads((copy / CALIBRATION_FILE).read_text())
    calibration[RERANK_KEY] = {**calibration[RERANK_KEY], "regions": "explain-7x7"}
    (copy / CALIBRATION_FILE).write_text(json.dumps(calibration))
    with pytest.raises(EngineError, match="'explain-7x7'.*fold_learned_regions"):
        RerankSpec.of(Embedder(resolve_model(str(copy), cache_dir)))


def test_a_pair_score_calibrated_the_old_way_asks_to_measure_again(
    tmp_path: Path, cache_dir: Path
) -> None:
    """Earlier versions judged query -> candidate MaxSim with the cosine's hubness; their
    threshold does not fit this version's score, so it is refused, not misapplied."""
    copy = tmp_path / "accurate"
    shutil.copytree(resolve_model("accurate", cache_dir).path, copy)
    calibration = json.loads((copy / CALIBRATION_FILE).read_text())
    verification = dict(calibration[RERANK_KEY]["verification"])
    del verification["pair_score"]
    calibration[RERANK_KEY] = {**calibration[RERANK_KEY], "verification": verification}
    (copy / CALIBRATION_FILE).write_text(json.dumps(calibration))
    with pytest.raises(EngineError, match="cosine hubness.*measure it again"):
        RerankSpec.of(Embedder(resolve_model(str(copy), cache_dir)))


@pytest.mark.parametrize("entry", [
    {"weight": "high"},
    {"weight": 1.5, "regions": REGIONS, "verification": {"weight": 3.0}},
], ids=["weight", "verification-without-threshold"])
def test_a_damaged_entry_fails_when_the_model_loads(tmp_path: Path, entry: dict) -> None:
    source = resolve_model("accurate", tmp_path / "cache").path
    copy = tmp_path / "accurate"
    shutil.copytree(source, copy)
    calibration = json.loads((copy / CALIBRATION_FILE).read_text())
    calibration[RERANK_KEY] = entry
    (copy / CALIBRATION_FILE).write_text(json.dumps(calibration))
    with pytest.raises(BundleError, match="damaged 'rerank' entry"):
        resolve_model(str(copy), tmp_path / "cache")


def _challenge(tmp_path: Path, demo_pairs: list[tuple[str, str]], queries: int) -> Path:
    rights = [right for _, right in demo_pairs[:queries]]
    path = tmp_path / "challenge.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["left", *(f"c{i}" for i in range(len(rights)))])
        for number, (left, _) in enumerate(demo_pairs[:queries]):
            writer.writerow([left, *np.roll(rights, number)])
    return path


def _scores(path: Path) -> list[list[float]]:
    with open(path, newline="") as handle:
        rows = list(csv.reader(handle))[1:]
    return [[float(value) for value in row[1:]] for row in rows]


def test_cli_rank_rerank_writes_the_rerankers_scores(
    tmp_path: Path, accurate: Embedder, reranker: Reranker, demo_dir: Path,
    demo_pairs: list[tuple[str, str]], cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lookalike rank --model accurate --rerank` scores each candidate as the re-ranker does
    (checked against describing the same files here); without --rerank the scores are cosines."""
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(cache_dir))
    challenge = _challenge(tmp_path, demo_pairs, 4)
    common = ["rank", "-c", str(challenge), "--query-dir", str(demo_dir / "left"),
              "--candidate-dir", str(demo_dir / "right"), "--model", "accurate",
              "--engine", "torch", "--no-progress"]
    runner = CliRunner()
    result = runner.invoke(app, [*common, "--rerank", "-o", str(tmp_path / "reranked.csv")])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [*common, "-o", str(tmp_path / "cosine.csv")])
    assert result.exit_code == 0, result.output
    reranked, cosines = _scores(tmp_path / "reranked.csv"), _scores(tmp_path / "cosine.csv")
    rights = [right for _, right in demo_pairs[:4]]
    for number, (left, _) in enumerate(demo_pairs[:4]):
        files = [demo_dir / "left" / f"{left}.jpg",
                 *(demo_dir / "right" / f"{r}.jpg" for r in np.roll(rights, number))]
        described = reranker.describe(np.stack([accurate.load_file(f)[0] for f in files]))
        np.testing.assert_allclose(reranked[number], reranker.scores(described[0], described[1:]),
                                   atol=1e-4)
        assert max(cosines[number]) <= 1.0 < 1.0 + reranker.spec.weight


def test_cli_rank_rerank_with_a_model_without_one_is_one_line_exit_2(
    tmp_path: Path, demo_dir: Path, demo_pairs: list[tuple[str, str]]
) -> None:
    result = CliRunner().invoke(app, [
        "rank", "-c", str(_challenge(tmp_path, demo_pairs, 2)), "--query-dir",
        str(demo_dir / "left"), "--candidate-dir", str(demo_dir / "right"), "--rerank",
        "--engine", "torch", "-o", str(tmp_path / "out.csv")])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "no measured re-ranker" in lines[0], result.output
    assert not (tmp_path / "out.csv").exists()
