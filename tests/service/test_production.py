"""Production behaviour: metrics, micro-batching, limits, API keys, durable writes."""

from __future__ import annotations

import asyncio
import io
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from lookalike.index.store import IndexStore
from lookalike.models.embedder import Embedder
from lookalike.models.preprocess import ImageDecodeError
from lookalike.service.app import create_app
from lookalike.service.batching import MicroBatcher
from lookalike.service.deps import ServiceState
from lookalike.service.metrics import ServiceMetrics
from lookalike.service.security import RateLimiter
from lookalike.service.settings import Settings


def make_client(settings: Settings, embedder: Embedder) -> tuple[TestClient, IndexStore]:
    store = IndexStore.open(settings.index, model_fingerprint=embedder.fingerprint)
    app = create_app(settings, ServiceState(settings, embedder, store))
    return TestClient(app), store


def test_metrics_count_requests_batches_and_items(
    client: TestClient, query_jpeg: tuple[str, bytes]
) -> None:
    _, data = query_jpeg
    for _ in range(3):
        client.post("/match", files={"image": ("q.jpg", data, "image/jpeg")})
    client.post("/match", data={"k": "3"})  # a 422
    text = client.get("/metrics").text
    assert 'lookalike_requests_total{method="POST",route="/match",status="200"} 3.0' in text
    assert 'lookalike_requests_total{method="POST",route="/match",status="422"} 1.0' in text
    assert "lookalike_embed_batch_size_count 3.0" in text
    assert "lookalike_index_items 24.0" in text
    assert 'lookalike_request_seconds_bucket{le="10.0",method="POST",route="/match"} 4.0' in text


def test_micro_batcher_joins_concurrent_requests(embedder: Embedder, small_image_dir: Path) -> None:
    """Eight concurrent callers share forward passes and each gets its own vector back."""
    paths = sorted(small_image_dir.rglob("*.jpg"))[:8]
    arrays = [embedder.preprocessor(embedder.preprocessor.decode(p.read_bytes())) for p in paths]
    expected = embedder.embed_arrays(np.stack(arrays))
    metrics = ServiceMetrics()

    async def run() -> list[np.ndarray]:
        batcher = MicroBatcher(embedder.embed_arrays, metrics, max_size=8, max_wait_ms=200)
        await batcher.start()
        try:
            return await asyncio.gather(*(batcher.embed(a[None]) for a in arrays))
        finally:
            await batcher.stop()

    results = asyncio.run(run())
    np.testing.assert_allclose(np.concatenate(results), expected, atol=1e-4)
    assert _batch_sizes(metrics)[0] < 8  # fewer forward passes than requests


def _batch_sizes(metrics: ServiceMetrics) -> tuple[float, float]:
    """(forward passes, images) the batcher has run."""
    samples = {s.name: s.value for s in metrics.batch_size.collect()[0].samples}
    return samples["lookalike_embed_batch_size_count"], samples["lookalike_embed_batch_size_sum"]


def test_batcher_decodes_uploads_and_runs_then(
    embedder: Embedder, small_image_dir: Path
) -> None:
    """Concurrent uploads share forward passes; a bad upload fails only its own request, with
    its field's name; ``then`` gets the request's own vectors, on the finish thread."""
    paths = sorted(small_image_dir.rglob("*.jpg"))[:6]
    uploads = [path.read_bytes() for path in paths]
    expected = np.stack([embedder.embed_bytes(data) for data in uploads])
    metrics = ServiceMetrics()

    async def run() -> list[object]:
        batcher = MicroBatcher(embedder.embed_arrays, metrics, embedder.preprocessor)
        await batcher.start()
        try:
            return await asyncio.gather(
                batcher.embed(uploads[:2]),
                batcher.embed([b"not an image"], names=["photo"]),
                batcher.embed(uploads[2:], then=lambda v: (threading.current_thread().name, v)),
                return_exceptions=True,
            )
        finally:
            await batcher.stop()

    pair, bad, (thread, rest) = asyncio.run(run())
    np.testing.assert_allclose(np.concatenate([pair, rest]), expected, atol=1e-4)
    assert isinstance(bad, ImageDecodeError) and "upload 'photo'" in str(bad)
    assert thread == "finish"
    passes, images = _batch_sizes(metrics)
    assert images == 6 and passes < 3


@pytest.mark.parametrize("lane_pixels", [4_000_000, 10**12], ids=["large-lane", "no-lane"])
def test_huge_images_never_take_every_decode_thread(
    embedder: Embedder, small_image_dir: Path, lane_pixels: int
) -> None:
    """More clients sending huge PNGs than there are decode threads: with the large-image lane a
    normal upload is embedded before any huge one; without it (a lane no image reaches) it waits
    for one. Order, not time, is asserted."""
    buffer = io.BytesIO()
    Image.new("RGB", (5000, 5000), "white").save(buffer, format="PNG")
    huge, normal = buffer.getvalue(), sorted(small_image_dir.rglob("*.jpg"))[0].read_bytes()
    finished: list[str] = []

    async def run() -> None:
        batcher = MicroBatcher(embedder.embed_arrays, ServiceMetrics(), embedder.preprocessor,
                               decode_workers=2, large_image_pixels=lane_pixels)
        await batcher.start()

        async def send(name: str, data: bytes) -> None:
            await batcher.embed([data])
            finished.append(name)

        try:
            sends = [asyncio.ensure_future(send(f"huge-{n}", huge)) for n in range(3)]
            await asyncio.sleep(0.05)  # the huge ones are queued or decoding
            await asyncio.gather(*sends, send("normal", normal))
        finally:
            await batcher.stop()

    asyncio.run(run())
    if lane_pixels < 25_000_000:
        assert finished[0] == "normal", finished
    else:
        assert finished.index("normal") >= 1, finished


def test_engine_errors_reach_every_caller(small_image_dir: Path) -> None:
    def broken(batch: np.ndarray) -> np.ndarray:
        raise RuntimeError("engine exploded")

    async def run() -> None:
        batcher = MicroBatcher(broken, ServiceMetrics(), max_size=4, max_wait_ms=50)
        await batcher.start()
        try:
            outcomes = await asyncio.gather(
                *(batcher.embed(np.zeros((1, 3, 8, 8), np.float32)) for _ in range(3)),
                return_exceptions=True,
            )
            assert all(isinstance(o, RuntimeError) for o in outcomes)
            with pytest.raises(RuntimeError):  # the worker survived and answers again
                await batcher.embed(np.zeros((1, 3, 8, 8), np.float32))
        finally:
            await batcher.stop()

    asyncio.run(run())


def test_max_wait_lets_a_batch_wait_for_company() -> None:
    """With ``max_wait_ms`` set, a batch waits for more requests, but never past ``max_size``:
    the second request joins the first; the full batch runs without waiting out the timer."""
    metrics = ServiceMetrics()

    async def run() -> float:
        batcher = MicroBatcher(lambda b: b[:, :2, 0, 0], metrics, max_size=2, max_wait_ms=60_000)
        await batcher.start()
        try:
            started = time.perf_counter()
            first = asyncio.create_task(batcher.embed(np.zeros((1, 3, 8, 8), np.float32)))
            await asyncio.sleep(0.05)
            await asyncio.gather(first, batcher.embed(np.ones((1, 3, 8, 8), np.float32)))
            return time.perf_counter() - started
        finally:
            await batcher.stop()

    assert asyncio.run(run()) < 30
    assert _batch_sizes(metrics) == (1, 2)


def test_a_caller_that_gives_up_does_not_break_the_batcher() -> None:
    """A request that times out cancels its future while its batch still runs; the batch's
    answer then has nobody to go to, and the next request is served as usual."""

    def slow(batch: np.ndarray) -> np.ndarray:
        time.sleep(0.2)
        return batch[:, :2, 0, 0]

    async def run() -> np.ndarray:
        batcher = MicroBatcher(slow, ServiceMetrics())
        await batcher.start()
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(batcher.embed(np.zeros((1, 3, 8, 8), np.float32)), 0.01)
            return await batcher.embed(np.ones((1, 3, 8, 8), np.float32))
        finally:
            await batcher.stop()

    assert asyncio.run(run()).tolist() == [[1, 1]]


def test_oversized_body_is_refused_from_its_header(settings: Settings, embedder: Embedder) -> None:
    small = settings.model_copy(update={"max_upload_bytes": 1000, "max_files_per_request": 2})
    client, store = make_client(small, embedder)
    with client:
        response = client.post(
            "/match", content=b"x" * 300_000, headers={"content-type": "multipart/form-data"}
        )
    store.close()
    assert response.status_code == 413 and "over the limit" in response.json()["detail"]


def test_rate_limit_answers_429(settings: Settings, embedder: Embedder) -> None:
    limited = settings.model_copy(update={"rate_limit_per_s": 0.5, "rate_limit_burst": 3})
    client, store = make_client(limited, embedder)
    with client:
        codes = [client.get("/health").status_code for _ in range(5)]
        blocked = client.get("/health")
    store.close()
    assert codes == [200, 200, 200, 429, 429]
    assert int(blocked.headers["retry-after"]) >= 1 and "rate limit" in blocked.json()["detail"]
    assert blocked.headers["x-content-type-options"] == "nosniff"  # refusals carry it too


def test_token_bucket_refills() -> None:
    limiter = RateLimiter(rate=1000.0, burst=1)
    assert limiter.retry_after("a") == 0
    assert limiter.retry_after("a") > 0
    assert limiter.retry_after("b") == 0  # clients are independent


def test_request_timeout_is_a_503(settings: Settings, embedder: Embedder) -> None:
    hurried = settings.model_copy(update={"request_timeout_s": 0.001})
    client, store = make_client(hurried, embedder)
    big = io.BytesIO()
    Image.new("RGB", (3000, 3000), "white").save(big, format="PNG")
    with client:
        response = client.post("/match", files={"image": ("big.png", big.getvalue(), "image/png")})
    store.close()
    assert response.status_code == 503 and "longer than" in response.json()["detail"]


def test_writes_need_an_api_key_when_keys_are_set(
    settings: Settings, embedder: Embedder, query_jpeg: tuple[str, bytes]
) -> None:
    guarded = settings.model_copy(update={"api_keys": ["s3cret"]})
    client, store = make_client(guarded, embedder)
    _, data = query_jpeg
    upload = {"image": ("new.jpg", data, "image/jpeg")}
    with client:
        assert client.post("/items", files=upload, data={"key": "new"}).status_code == 401
        wrong = {"X-API-Key": "guess"}
        assert (
            client.post("/items", files=upload, data={"key": "new"}, headers=wrong).status_code
            == 401
        )
        good = {"X-API-Key": "s3cret"}
        created = client.post(
            "/items", files=upload, data={"key": "new", "metadata": '{"a": 1}'}, headers=good
        )
        assert created.status_code == 201 and created.json()["metadata"] == {"a": 1}
        assert (
            client.post("/items", files=upload, data={"key": "new"}, headers=good).status_code
            == 409
        )
        assert client.get("/items/new").status_code == 200  # reads stay open
        assert client.delete("/items/new").status_code == 401
        assert client.delete("/items/new", headers=good).json() == {"removed": "new", "items": 24}
        assert client.delete("/items/new", headers=good).status_code == 404
    store.close()


def test_added_item_is_searchable_and_durable(
    client: TestClient, settings: Settings, query_jpeg: tuple[str, bytes], embedder: Embedder
) -> None:
    _, data = query_jpeg
    response = client.post(
        "/items", files={"image": ("x.jpg", data, "image/jpeg")}, data={"key": "uploads/x"}
    )
    assert response.status_code == 201, response.text
    matches = client.post("/match", data={"query_key": "uploads/x", "k": "1"}).json()["matches"]
    assert matches[0]["score"] == pytest.approx(1.0, abs=1e-3)  # the original image
    bad = client.post(
        "/items", files={"image": ("x.jpg", b"nope", "image/jpeg")}, data={"key": "uploads/y"}
    )
    assert bad.status_code == 415
    meta = client.post(
        "/items",
        files={"image": ("x.jpg", data, "image/jpeg")},
        data={"key": "uploads/z", "metadata": "[1, 2]"},
    )
    assert meta.status_code == 422 and "JSON object" in meta.json()["detail"]
    reopened = IndexStore.open(settings.index)  # another connection sees the committed add
    assert "uploads/x" in reopened and "uploads/y" not in reopened
    reopened.close()


def test_concurrent_matches(client: TestClient, query_jpeg: tuple[str, bytes]) -> None:
    """Twelve requests at once through the micro-batcher each get their own right answer."""
    key, data = query_jpeg

    def one(_: int) -> tuple[int, str]:
        response = client.post(
            "/match", files={"image": ("q.jpg", data, "image/jpeg")}, data={"k": "1"}
        )
        return response.status_code, response.json()["matches"][0]["key"]

    with ThreadPoolExecutor(12) as pool:
        outcomes = list(pool.map(one, range(12)))
    assert outcomes == [(200, key)] * 12


def test_the_large_image_lane_decodes_in_a_process_exactly_as_threads_do(
    embedder: Embedder, small_image_dir: Path
) -> None:
    """With every image sent to the large-image lane (a lane threshold of 1 pixel) and a
    deadline, uploads decode in the worker process: the vectors equal the in-thread path's, and
    a decoding error still names its upload."""
    paths = sorted(small_image_dir.rglob("*.jpg"))[:3]
    uploads = [p.read_bytes() for p in paths]
    expected = embedder.embed_arrays(np.stack(
        [embedder.preprocessor(embedder.preprocessor.decode(data)) for data in uploads]))
    cut = uploads[0][: len(uploads[0]) // 2]  # a JPEG cut short: the worker's decoder refuses it

    async def run() -> tuple[np.ndarray, BaseException, int | None]:
        batcher = MicroBatcher(embedder.embed_arrays, ServiceMetrics(), embedder.preprocessor,
                               large_image_pixels=1, decode_timeout_s=60)
        await batcher.start()
        try:
            vectors = await batcher.embed(uploads)
            bad = (await asyncio.gather(batcher.embed([cut], names=["photo"]),
                                        return_exceptions=True))[0]
            assert batcher.decode_process is not None
            return vectors, bad, batcher.decode_process.pid
        finally:
            await batcher.stop()

    vectors, bad, pid = asyncio.run(run())
    np.testing.assert_allclose(vectors, expected, atol=1e-5)
    assert isinstance(bad, ImageDecodeError) and "upload 'photo'" in str(bad), bad
    assert pid is not None
