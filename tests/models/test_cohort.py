"""The pair scores' cohort (issue 14): hubness is the mean cosine to the k nearest cohort
vectors; a cohort (with its product-quantized region images) round-trips and refuses damage,
other weights and other widths; the re-ranked pair score subtracts half of each side's hubness
of that same score; the shipped accurate model carries its cohort of the 3,000 training images
and 800 of their regions; a damaged hubness entry, or one without its cohort, is refused when
the model loads."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from lookalike.core.scoring import hubness, unit
from lookalike.models.cohort import Cohort, CohortRegions
from lookalike.models.embedder import Embedder
from lookalike.models.errors import BundleError
from lookalike.models.model import CALIBRATION_FILE, COHORT_FILE
from lookalike.models.rerank import PAIR_SCORE, Reranker, maxsim, reranker_for
from lookalike.models.resolve import resolve_model


def test_hubness_is_the_mean_of_the_k_nearest_cosines() -> None:
    rng = np.random.default_rng(0)
    vectors, cohort = unit(rng.normal(size=(5, 8))), unit(rng.normal(size=(40, 8)))
    expected = [np.sort(cohort @ v)[::-1][:7].mean() for v in vectors]
    np.testing.assert_allclose(hubness(vectors, cohort, 7), expected, atol=1e-6)
    np.testing.assert_allclose(hubness(vectors, cohort, 100), (vectors @ cohort.T).mean(axis=1),
                               atol=1e-6)


def test_a_cohort_round_trips_and_refuses_damage_other_weights_and_widths(
    tmp_path: Path
) -> None:
    rng = np.random.default_rng(1)
    vectors = unit(rng.normal(size=(20, 8))).astype(np.float32)
    Cohort(vectors, {"images": 20}).save(tmp_path, "a" * 64)
    loaded = Cohort.load(tmp_path, "a" * 64, 8)
    assert loaded.facts == {"images": 20}
    # int8 on disk: what cross-validation measured (as_stored), close to the vectors given
    np.testing.assert_array_equal(loaded.vectors, Cohort.as_stored(vectors))
    np.testing.assert_allclose(loaded.vectors, vectors, atol=1e-2)
    assert (tmp_path / COHORT_FILE).stat().st_size < 20 * 8 + 20 * 4 + 1000
    with pytest.raises(BundleError, match="embedded by other weights"):
        Cohort.load(tmp_path, "b" * 64, 8)
    with pytest.raises(BundleError, match=r"needs \(N, 16\)"):
        Cohort.load(tmp_path, "a" * 64, 16)
    (tmp_path / COHORT_FILE).write_bytes((tmp_path / COHORT_FILE).read_bytes()[:50])
    with pytest.raises(BundleError, match="damaged"):
        Cohort.load(tmp_path, "a" * 64, 8)
    with pytest.raises(BundleError, match="no cohort.*fold_learned_regions"):
        Cohort.load(tmp_path / "missing", "a" * 64, 8)


def test_cohort_regions_round_trip_as_measured_and_refuse_damage(tmp_path: Path) -> None:
    """Saved regions come back as cross-validation measured them (:meth:`CohortRegions.stored`,
    product-quantized: 32 bytes a region, not 1,024), close to the regions given."""
    rng = np.random.default_rng(2)
    vectors = unit(rng.normal(size=(20, 8))).astype(np.float32)
    regions = unit(rng.normal(size=(12, 49, 64))).astype(np.float32)
    found = CohortRegions(np.sort(rng.choice(20, 12, replace=False)), regions,
                          rng.dirichlet(np.ones(49), size=12))
    Cohort(vectors, {"images": 20}, found).save(tmp_path, "a" * 64)
    loaded = Cohort.load(tmp_path, "a" * 64, 8).regions
    expected = found.stored()
    np.testing.assert_array_equal(loaded.rows, found.rows)
    np.testing.assert_allclose(loaded.regions, expected.regions, atol=1e-6)
    np.testing.assert_allclose(loaded.weights, expected.weights, atol=1e-6)
    np.testing.assert_allclose(loaded.weights, found.weights, atol=1e-3)
    cosines = (loaded.regions * regions).sum(axis=-1)
    assert cosines.mean() > 0.9  # 32 sub-vectors of 2 values, 256 centroids each
    assert (tmp_path / COHORT_FILE).stat().st_size < 12 * 49 * 32 + 32 * 256 * 2 * 4 + 10_000
    tensors = load_file(str(tmp_path / COHORT_FILE))
    tensors["region_rows"][0] = 99  # no such cohort image
    save_file(tensors, str(tmp_path / COHORT_FILE),
              metadata={"model_fingerprint": "a" * 64, "facts": "{}"})
    with pytest.raises(BundleError, match="cohort regions need rows"):
        Cohort.load(tmp_path, "a" * 64, 8)


@pytest.fixture(scope="module")
def accurate(cache_dir: Path) -> Embedder:
    return Embedder(resolve_model("accurate", cache_dir))


def test_the_accurate_model_ships_its_cohort(accurate: Embedder) -> None:
    model = accurate.bundle
    cohort = Cohort.load(model.path, model.fingerprint, accurate.dim)
    assert cohort.vectors.shape == (3000, accurate.dim) and cohort.facts["images"] == 3000
    assert cohort.regions is not None and cohort.regions.regions.shape == (800, 49, 256)
    assert len(set(cohort.regions.rows)) == 800 == cohort.facts["region_images"]
    verification = model.calibration["rerank"]["verification"]
    assert verification["hubness_k"] in (0, 5, 10, 20, 50)
    assert verification["pair_score"] == PAIR_SCORE


def test_the_pair_score_subtracts_half_of_each_sides_hubness_of_that_score(
    accurate: Embedder, cache_dir: Path, demo_dir: Path
) -> None:
    """Computed here from the descriptions and the cohort file, for a correction of k=20 and
    none: cosine + w x MaxSim both ways - (hub(a) + hub(b)) / 2, each hub the mean of an
    image's 20 best (cosine + w x MaxSim both ways) among the cohort's region images."""
    reranker = reranker_for(accurate, cache_dir)
    paths = sorted((demo_dir / "left").glob("*.jpg"))[:2]
    a, b = reranker.describe(np.stack([accurate.load_file(p)[0] for p in paths]))
    dim, cohort = accurate.dim, reranker.cohort()
    spec = reranker.spec.verification
    found = cohort.regions

    def to_cohort(x: np.ndarray) -> np.ndarray:
        late = maxsim(reranker.regions(x), found.regions, True, reranker.weights(x),
                      found.weights)
        return cohort.vectors[found.rows] @ x[:dim] + spec.weight * late

    pair = a[:dim] @ b[:dim] + spec.weight * maxsim(
        reranker.regions(a), reranker.regions(b)[None], True, reranker.weights(a),
        reranker.weights(b)[None])[0]
    for k in (0, 20):
        hubs = [np.sort(to_cohort(v))[-k:].mean() if k else 0.0
                for v in (a, b)]
        changed = dataclasses.replace(reranker.spec,
                                      verification=dataclasses.replace(spec, hubness_k=k))
        got, _ = Reranker(accurate, reranker.describe, reranker.layout, changed).pair_score(a, b)
        assert got == pytest.approx(pair - 0.5 * sum(hubs), abs=1e-4)


@pytest.mark.parametrize(("change", "message"), [
    ({"hubness": {"k": 0, "threshold": 0.1, "target_far": 0.01}}, "damaged 'hubness' entry"),
    ({"hubness": {"k": 20, "threshold": "high", "target_far": 0.01}}, "damaged 'hubness'"),
    ("no cohort", "corrects hubness, but the model has no cohort.safetensors"),
])
def test_a_damaged_hubness_entry_or_a_missing_cohort_fails_when_the_model_loads(
    tmp_path: Path, change: object, message: str
) -> None:
    copy = tmp_path / "accurate"
    shutil.copytree(resolve_model("accurate", tmp_path / "cache").path, copy)
    if change == "no cohort":
        (copy / COHORT_FILE).unlink()
    else:
        calibration = json.loads((copy / CALIBRATION_FILE).read_text())
        (copy / CALIBRATION_FILE).write_text(json.dumps({**calibration, **change}))
    with pytest.raises(BundleError, match=message):
        resolve_model(str(copy), tmp_path / "cache")
