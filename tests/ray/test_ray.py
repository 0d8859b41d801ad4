"""Same answers on Ray: the Ray build against the single-process build, sharded Ray Serve
against the unsharded app, on a real local Ray instance (2 CPUs) and the 200 demo images.

One Ray instance serves the whole module (starting one takes ~15 s on 2 cores). Not marked
slow: CI runs it (about a minute and a half on the quiet 2-core machine, 4 minutes under a
load of 10, most of it embedding the demo images three times: single, Ray, Ray with IVF).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import faiss
import httpx
import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="the Ray tests need 'lookalike[ray]' (make test has it)")

from fastapi.testclient import TestClient  # noqa: E402
from ray import serve  # noqa: E402

from lookalike.index import ray_build  # noqa: E402
from lookalike.index.build import build_index, discover_images  # noqa: E402
from lookalike.index.ray_build import (  # noqa: E402
    SHARD_DIR,
    RayOptions,
    build_index_on_ray,
    plan_shards,
    ray_session,
)
from lookalike.index.sharding import split_store  # noqa: E402
from lookalike.index.store import IndexStore, StoreInputError  # noqa: E402
from lookalike.models.engines import DEFAULT_ENGINE, ENGINES  # noqa: E402
from lookalike.models.resolve import ModelOptions, create_embedder  # noqa: E402
from lookalike.service.app import create_app  # noqa: E402
from lookalike.service.ray_serve import deploy  # noqa: E402
from lookalike.service.settings import Settings  # noqa: E402

PORT = 8520
SHARD_SIZE = 48


@pytest.fixture(scope="module")
def options(cache_dir: Path) -> ModelOptions:
    return ModelOptions(engine=DEFAULT_ENGINE, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def local_ray() -> Iterator[None]:
    with ray_session(RayOptions(num_cpus=2)):
        yield


@pytest.fixture(scope="module")
def single_store(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path,
                 options: ModelOptions) -> Path:
    """The reference: the single-process build (it also caches the ONNX conversion that the
    Ray actors then load)."""
    path = tmp_path_factory.mktemp("single") / "index"
    build_index(demo_dir, path, create_embedder(options), progress=False)
    return path


@pytest.fixture(scope="module")
def ray_store(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path, options: ModelOptions,
              single_store: Path, local_ray: None) -> Path:
    path = tmp_path_factory.mktemp("ray") / "index"
    report = build_index_on_ray(demo_dir, path, options, RayOptions(shard_size=SHARD_SIZE),
                                progress=False)
    assert report.added == 200 and report.total == 200 and not report.failed
    assert not (path / SHARD_DIR).exists()  # shards are removed once the store is saved
    return path


def test_ray_build_gives_the_single_process_vectors_and_neighbours(
    single_store: Path, ray_store: Path, options: ModelOptions
) -> None:
    single = IndexStore.open(single_store, background=False)
    on_ray = IndexStore.open(ray_store, background=False)
    try:
        keys = single.keys()
        assert on_ray.keys() == keys  # same items, added in the same order: the same ids
        a, b = single.vectors(keys), on_ray.vectors(keys)
        assert float((1 - (a * b).sum(axis=1)).max()) <= ENGINES[options.engine].spec.tolerance
        queries = a[::7]
        for x, y in zip(single.search(queries, 10), on_ray.search(queries, 10), strict=True):
            assert [m.key for m in x] == [m.key for m in y]
        assert single.get_many(keys) == on_ray.get_many(keys)  # paths, sha256, metadata
        assert all(on_ray.thumbnail(key) for key in keys[:5])
    finally:
        single.close()
        on_ray.close()


def test_an_interrupted_ray_build_resumes_without_re_embedding_finished_shards(
    tmp_path: Path, demo_dir: Path, options: ModelOptions, single_store: Path,
    local_ray: None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    images = discover_images(demo_dir)[:100]
    path = tmp_path / "index"
    real_store_batch, real_embed = ray_build.store_batch, ray_build._embed_shards
    stored: list[int] = []

    def crash_after_first_shard(store, chosen, *args):  # type: ignore[no-untyped-def]
        if stored:
            raise RuntimeError("killed while filling the store")
        stored.append(len(chosen))
        real_store_batch(store, chosen, *args)

    monkeypatch.setattr(ray_build, "store_batch", crash_after_first_shard)
    with pytest.raises(RuntimeError, match="killed"):
        build_index_on_ray(images, path, options, RayOptions(shard_size=SHARD_SIZE),
                           progress=False)
    assert len(list((path / SHARD_DIR).glob("shard-*.parquet"))) == 3
    assert stored == [SHARD_SIZE]

    embedded: list[int] = []

    def record(shards, *args):  # type: ignore[no-untyped-def]
        embedded.extend(shard.number for shard in shards)
        real_embed(shards, *args)

    monkeypatch.setattr(ray_build, "store_batch", real_store_batch)
    monkeypatch.setattr(ray_build, "_embed_shards", record)
    report = build_index_on_ray(images, path, options, RayOptions(shard_size=SHARD_SIZE),
                                progress=False)
    assert embedded == []  # the finished shards were on disk: nothing went to Ray again
    assert (report.unchanged, report.added, report.total) == (SHARD_SIZE, 100 - SHARD_SIZE, 100)

    resumed = IndexStore.open(path, background=False)
    single = IndexStore.open(single_store, background=False)
    try:
        keys = [image.key for image in images]
        assert resumed.keys() == keys
        np.testing.assert_allclose(resumed.vectors(keys), single.vectors(keys), atol=1e-6)
    finally:
        resumed.close()
        single.close()


def test_shards_are_named_by_their_work(demo_dir: Path) -> None:
    images = discover_images(demo_dir)[:10]
    todo = [(image, f"sha-{i}") for i, image in enumerate(images)]
    first = plan_shards(images, todo, 4)
    assert [len(s.images) for s in first] == [4, 4, 2]
    assert [s.name for s in plan_shards(images, todo, 4)] == [s.name for s in first]
    # The first slice is stored: the others keep their numbers and names.
    later = plan_shards(images, todo[4:], 4)
    assert [s.name for s in later] == [s.name for s in first[1:]]
    changed = [(image, "changed" if i == 9 else sha) for i, (image, sha) in enumerate(todo)]
    assert plan_shards(images, changed, 4)[2].name != first[2].name


#: An IVF the 200 demo images can train (the store asks 39 vectors a list: 156).
IVF = "IVF4,Flat"


@pytest.fixture(scope="module")
def ivf_ray_store(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path,
                  options: ModelOptions, single_store: Path, local_ray: None) -> Path:
    """A Ray build with an explicit IVF factory: filled per shard in Ray tasks and merged."""
    path = tmp_path_factory.mktemp("ray-ivf") / "index"
    merges: list[int] = []

    def spy(*args, **kwargs):  # type: ignore[no-untyped-def]
        index = real_merged_ivf(*args, **kwargs)
        merges.append(index.ntotal)
        return index

    real_merged_ivf = ray_build.merged_ivf
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ray_build, "merged_ivf", spy)
        report = build_index_on_ray(demo_dir, path, options, RayOptions(shard_size=SHARD_SIZE),
                                    factory=IVF, progress=False)
    assert report.total == 200 and merges == [200]  # the store adopted the merged index
    return path


def exact_top10(store: IndexStore, queries: np.ndarray) -> list[list[str]]:
    return [[m.key for m in row] for row in store.search(queries, 10)]


def test_a_ray_ivf_build_merges_per_shard_indexes_into_the_single_build_s_answers(
    single_store: Path, ivf_ray_store: Path, tmp_path: Path
) -> None:
    exact = IndexStore.open(single_store, background=False)  # auto: 200 items are Flat
    on_ray = IndexStore.open(ivf_ray_store, background=False)
    # The single-machine build with the same factory, from the same vectors.
    keys = exact.keys()
    local = IndexStore.create(tmp_path / "local", dim=exact.dim, factory=IVF,
                              model_fingerprint=exact.model_fingerprint, background=False)
    try:
        local.add(keys, exact.vectors(keys))
        local.save()
        index = on_ray.manifest["index"]
        assert (index["factory"], index["family"], index["indexed"]) == (IVF, "ivf", 200)
        assert index["recall_at_10"] >= on_ray.manifest["target_recall"]
        assert on_ray.keys() == keys
        queries = exact.vectors(keys)[::5]
        truth = exact_top10(exact, queries)
        hits = [len(set(a) & set(b)) for a, b in zip(exact_top10(on_ray, queries), truth,
                                                     strict=True)]
        assert sum(hits) / (10 * len(truth)) >= on_ray.manifest["target_recall"]
        for store in (on_ray, local):  # every list probed: exactly the exact answers
            store.tune(target_recall=1.0)
            assert store.manifest["index"]["params"] == {"nprobe": 4}
            assert exact_top10(store, queries) == truth
    finally:
        exact.close()
        on_ray.close()
        local.close()


def test_adopting_a_bad_index_is_refused_and_changes_nothing(
    ivf_ray_store: Path, tmp_path: Path, local_ray: None
) -> None:
    path = tmp_path / "index"
    shutil.copytree(ivf_ray_store, path)
    store = IndexStore.open(path, background=False)
    try:
        before = (store.manifest["index"], (path / "manifest.json").read_bytes())
        queries = store.vectors(store.keys()[::20])
        answers = store.search(queries, 10)

        def missing_ids(factory, ids, take):  # type: ignore[no-untyped-def]
            return ray_build.merged_ivf(factory, ids[:-5], take, SHARD_SIZE)

        def wrong_dim(factory, ids, take):  # type: ignore[no-untyped-def]
            return faiss.index_factory(store.dim + 1, factory, faiss.METRIC_INNER_PRODUCT)

        def wrong_type(factory, ids, take):  # type: ignore[no-untyped-def]
            return ray_build.merged_ivf("IVF2,Flat", ids, take, SHARD_SIZE)

        refusals = ((missing_ids, r"5 missing \(e\.g\. \[195, 196, 197\]\)"),
                    (wrong_dim, f"dimension {store.dim + 1}, the store holds {store.dim}"),
                    (wrong_type, f"not a trained {IVF} index"))
        for build, reason in refusals:
            with pytest.raises(StoreInputError, match=reason):
                store.adopt_index(build)
            assert (store.manifest["index"], (path / "manifest.json").read_bytes()) == before
            assert store.search(queries, 10) == answers
        # A type that does not merge (the store's plan for small stores) is left to the store.
        def zeros(ids: np.ndarray) -> np.ndarray:
            return np.zeros((len(ids), store.dim), np.float32)

        assert ray_build.merged_ivf("Flat", np.arange(200), zeros, SHARD_SIZE) is None
    finally:
        store.close()


@pytest.fixture(scope="module")
def sharded_service(single_store: Path, cache_dir: Path, local_ray: None,
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    index = tmp_path_factory.mktemp("served") / "index"
    shutil.copytree(single_store, index)
    settings = Settings(index=index, cache_dir=cache_dir, host="127.0.0.1", port=PORT,
                        torch_threads=1)
    deploy(settings, shards=2, replicas=1, embed_replicas=1)
    url = f"http://127.0.0.1:{PORT}"
    deadline = time.monotonic() + 120
    while httpx.get(f"{url}/ready").status_code != 200:
        assert time.monotonic() < deadline, "the Ray Serve app did not become ready"
        time.sleep(1)
    try:
        yield url
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def unsharded(single_store: Path, cache_dir: Path) -> Iterator[TestClient]:
    with TestClient(create_app(Settings(index=single_store, cache_dir=cache_dir))) as client:
        yield client


def test_ready_reports_every_shard(sharded_service: str) -> None:
    ready = httpx.get(f"{sharded_service}/ready").json()
    assert ready["items"] == 200 and ready["index"]["count"] == 200
    assert [(s["shard"], s["items"]) for s in ready["shards"]] == [(0, 100), (1, 100)]


def assert_same_matches(sharded: httpx.Response, single: httpx.Response) -> None:
    """The same keys in the same ranks, scores within float32 rounding."""
    assert sharded.status_code == single.status_code == 200, (sharded.text, single.text)
    a, b = sharded.json()["matches"], single.json()["matches"]
    assert [(m["key"], m["rank"], m["metadata"]) for m in a] == \
        [(m["key"], m["rank"], m["metadata"]) for m in b]
    np.testing.assert_allclose([m["score"] for m in a], [m["score"] for m in b], atol=1e-5)


@pytest.mark.parametrize("form", [
    {"k": "10"},
    {"k": "5", "exclude": ["left/fum", "right/cbi"]},
    {"candidates": ["right/cbi", "left/bpp", "right/zoh", "left/abh"]},
    {"k": "5", "where": '{"added": {"gte": "2000-01-01"}}', "min_score": "0.3"},
    {"candidates": ["right/cbi", "left/bpp"], "where": '{"added": {"lt": "2000-01-01"}}'},
])
def test_sharded_match_equals_unsharded(
    sharded_service: str, unsharded: TestClient, demo_dir: Path, form: dict
) -> None:
    for name in ("left/fum", "right/zoh", "left/abh"):
        upload = {"image": (f"{name}.jpg", (demo_dir / f"{name}.jpg").read_bytes(),
                            "image/jpeg")}
        assert_same_matches(
            httpx.post(f"{sharded_service}/match", data=form, files=upload, timeout=30),
            unsharded.post("/match", data=form, files=upload),
        )
    by_key = {"query_key": "left/fum", "k": "10"}
    assert_same_matches(httpx.post(f"{sharded_service}/match", data=by_key, timeout=30),
                        unsharded.post("/match", data=by_key))


def test_sharded_service_errors_are_the_unsharded_ones(
    sharded_service: str, unsharded: TestClient
) -> None:
    for form in ({"query_key": "no/such"}, {"query_key": "left/fum", "candidates": ["nope"]}):
        sharded = httpx.post(f"{sharded_service}/match", data=form, timeout=30)
        single = unsharded.post("/match", data=form)
        assert (sharded.status_code, sharded.json()) == (single.status_code, single.json())
    removal = httpx.delete(f"{sharded_service}/items/left/fum", timeout=30)
    assert removal.status_code == 503 and "read-only" in removal.json()["detail"]


def test_split_is_reused_until_the_store_changes(single_store: Path, tmp_path: Path) -> None:
    index = tmp_path / "index"
    shutil.copytree(single_store, index)
    paths = split_store(index, 3)
    stamp = (paths[0].parent / "stamp.json").stat().st_mtime_ns
    assert split_store(index, 3) == paths
    assert (paths[0].parent / "stamp.json").stat().st_mtime_ns == stamp
    store = IndexStore.open(index, background=False)
    store.remove(["left/fum"])
    store.save()
    store.close()
    split_store(index, 3)
    counts = []
    for path in paths:
        shard = IndexStore.open(path, background=False)
        counts.append(len(shard))
        assert "left/fum" not in shard
        shard.close()
    assert sum(counts) == 199 and max(counts) - min(counts) <= 1
