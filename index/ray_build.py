"""Build an index store on Ray: Ray Data embeds shards of images in an actor pool, the driver
fills the store from the shards.

Why this shape: embedding is the expensive part (hours per 100M images on CPUs) and is
embarrassingly parallel, so it runs as a Ray Data ``map_batches`` over *shards* (a few
hundred images each) with one model per actor (``num_gpus`` per actor where the cluster has
GPUs). Each actor writes its shard as one Parquet file (keys, paths, sha256, metadata, the
vectors, thumbnails, and the images that failed with their reason) by atomic rename, so a
shard is either whole on disk or absent: after a crash or Ctrl-C a re-run skips every
finished shard. The FAISS side stays the store's own: the driver adds shard after shard (each
an ``add`` of the :class:`~.store.IndexStore`). For an IVF index the FAISS build is spread
too, the way FAISS's own distributed recipe does it: the driver trains the IVF once on a
sample (the store's own training step), Ray tasks fill copies of the trained empty index with
one slice of the store's ids each (``add_with_ids``), the driver merges them list by list
(``faiss.merge_into``, what ``faiss.contrib.ondisk.merge_ondisk`` does on disk) and the store
adopts the result as its next generation (:meth:`~.store.IndexStore.adopt_index`: checked,
tuned, swapped in). Flat and HNSW are built by the store itself, as the single-process build
does (an HNSW graph cannot be merged).

Shards are cut from the source's image list (not from what is left to embed) and named by a
hash of the work they hold, so a re-run after a crash in the store phase finds the same names
for the shards still to add. They live in ``STORE/ray-shards/`` and are deleted once the
store is saved. On a multi-machine cluster that folder must be on storage every node sees.

Ray is an optional extra (``pip install 'lookalike[ray]'``): this module is imported only by
``lookalike index build --ray``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from ..core.files import atomic_write
from ..models.preprocess import make_thumbnail
from ..models.resolve import ModelOptions, create_embedder
from .build import (
    BuildReport,
    ImageSource,
    discover_images,
    finish_build,
    open_store,
    plan_build,
    store_batch,
)
from .generations import (
    NotTrainableError,
    describe_family,
    new_faiss_index,
    trained_index,
)
from .store import IndexStore

__all__ = ["RayOptions", "Shard", "build_index_on_ray", "merged_ivf", "plan_shards",
           "ray_session", "read_shard"]

log = logging.getLogger(__name__)

SHARD_DIR = "ray-shards"
#: Object store of a local Ray instance: shards are small (paths in, a Parquet file out).
LOCAL_OBJECT_STORE_BYTES = 256 * 1024 * 1024


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray job runs.

    ``address`` names an existing cluster (``ray://host:10001`` or ``auto``); without it a
    local instance starts with ``num_cpus`` CPUs (default: all) and is shut down after.
    ``actors`` is the embedding pool's size (default: one per ``threads_per_actor`` CPUs of
    the cluster, or one per GPU when it has GPUs).
    """

    address: str | None = None
    num_cpus: int | None = None
    actors: int | None = None
    threads_per_actor: int = 1
    shard_size: int = 256


@dataclass(frozen=True)
class Shard:
    """One unit of Ray work: the images to embed of one slice of the source."""

    number: int
    images: tuple[tuple[ImageSource, str | None], ...]

    @property
    def name(self) -> str:
        """``shard-NNNNNN-HASH.parquet``: the hash covers keys, paths and sha256, so a shard
        file is reused only for exactly the work it holds."""
        digest = hashlib.sha256()
        for image, sha in self.images:
            digest.update(f"{image.key}\0{image.path}\0{sha}\n".encode())
        return f"shard-{self.number:06d}-{digest.hexdigest()[:16]}.parquet"


def plan_shards(
    images: Sequence[ImageSource], todo: Sequence[tuple[ImageSource, str | None]],
    shard_size: int,
) -> list[Shard]:
    """Cut the readable images of the source into slices of ``shard_size`` and keep, in each,
    those still to embed; slices with nothing to do are left out."""
    wanted = {image.key: digest for image, digest in todo}
    readable = [image for image in images if image.error is None]
    shards = []
    for number, start in enumerate(range(0, len(readable), shard_size)):
        work = tuple((image, wanted[image.key]) for image in readable[start:start + shard_size]
                     if image.key in wanted)
        if work:
            shards.append(Shard(number, work))
    return shards


def _shard_row(shard: Shard) -> dict[str, Any]:
    items = [{"key": image.key, "path": str(image.path), "sha256": sha,
              "metadata": image.metadata} for image, sha in shard.images]
    return {"name": shard.name, "items": json.dumps(items)}


class ShardEmbedder:
    """A Ray Data actor: one model, loaded once; each call embeds whole shards and writes each
    as a Parquet file by atomic rename."""

    def __init__(self, options: ModelOptions, out: str, batch_size: int, thumbnails: bool):
        self.embedder = create_embedder(options)
        self.out = Path(out)
        self.batch_size = batch_size
        self.thumbnails = thumbnails

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names, counts, seconds = [], [], []
        for name, items in zip(batch["name"], batch["items"], strict=True):
            started = time.perf_counter()
            rows = json.loads(str(items))
            table = self._embed(rows)
            atomic_write(self.out / str(name), lambda path, t=table: pq.write_table(t, path))
            names.append(str(name))
            counts.append(len(rows))
            seconds.append(time.perf_counter() - started)
        return {"name": np.array(names), "images": np.array(counts, np.int64),
                "seconds": np.array(seconds, np.float64)}

    def _embed(self, rows: list[dict[str, Any]]) -> pa.Table:
        dim = self.embedder.dim
        vectors: list[np.ndarray | None] = [None] * len(rows)
        thumbs: list[bytes | None] = [None] * len(rows)
        errors: list[str | None] = [None] * len(rows)
        extra = make_thumbnail if self.thumbnails else None
        paths = [Path(row["path"]) for row in rows]
        for part in self.embedder.embed_files(paths, self.batch_size, extra=extra):
            for index, reason in part.errors.items():
                errors[index] = reason
            for row, index in enumerate(part.indices):
                vectors[index] = part.vectors[row]
                if self.thumbnails:
                    thumbs[index] = part.extras[row]
        return pa.table({
            "key": [row["key"] for row in rows],
            "path": [row["path"] for row in rows],
            "sha256": [row["sha256"] for row in rows],
            "metadata": [json.dumps(row["metadata"]) for row in rows],
            "vector": pa.array([v.tolist() if v is not None else None for v in vectors],
                               pa.list_(pa.float32(), dim)),
            "thumbnail": pa.array(thumbs, pa.binary()),
            "error": pa.array(errors, pa.string()),
        })


def read_shard(path: Path) -> tuple[list[tuple[ImageSource, str | None]], np.ndarray,
                                     list[bytes | None], dict[str, str]]:
    """A shard file -> (embedded images with their sha256, their vectors, thumbnails, and
    ``key -> reason`` for the images that failed)."""
    table = pq.read_table(path).to_pydict()
    chosen, vectors, thumbs, failed = [], [], [], {}
    for key, image_path, sha, meta, vector, thumb, error in zip(
        table["key"], table["path"], table["sha256"], table["metadata"], table["vector"],
        table["thumbnail"], table["error"], strict=True,
    ):
        if error is not None:
            failed[key] = error
            continue
        chosen.append((ImageSource(key, Path(image_path), json.loads(meta)), sha))
        vectors.append(vector)
        thumbs.append(thumb)
    return chosen, np.array(vectors, np.float32).reshape(len(chosen), -1), thumbs, failed


@contextmanager
def ray_session(options: RayOptions) -> Iterator[None]:
    """Connect to ``options.address``, or start a small local instance (no dashboard, a small
    object store) and shut it down afterwards. An already started Ray is used as it is."""
    if ray.is_initialized():
        yield
        return
    if options.address:
        ray.init(address=options.address, log_to_driver=False)
    else:
        ray.init(num_cpus=options.num_cpus, include_dashboard=False, log_to_driver=False,
                 object_store_memory=LOCAL_OBJECT_STORE_BYTES)
    try:
        yield
    finally:
        ray.shutdown()


def _pool(options: RayOptions) -> tuple[int, float, float]:
    """(actors, CPUs per actor, GPUs per actor) for the cluster Ray is connected to.

    With GPUs each actor reserves one, so that actors spread one per GPU; the engines of
    :mod:`lookalike.models.engines` run on the CPU today, so a GPU speeds nothing up until a
    CUDA engine is registered there."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus:
        return options.actors or gpus, options.threads_per_actor, 1.0
    cpus = int(resources.get("CPU", 1))
    return (options.actors or max(1, cpus // options.threads_per_actor),
            options.threads_per_actor, 0.0)


def _embed_shards(
    shards: Sequence[Shard], out: Path, model: ModelOptions, ray_options: RayOptions,
    batch_size: int, thumbnails: bool, progress: bool,
) -> None:
    """Run the actor pool over ``shards``; each finished shard is on disk when it is counted."""
    actors, cpus, gpus = _pool(ray_options)
    actors = min(actors, len(shards))
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    model = replace(model, threads=ray_options.threads_per_actor)
    dataset = ray.data.from_items([_shard_row(shard) for shard in shards],
                                  override_num_blocks=len(shards))
    results = dataset.map_batches(
        ShardEmbedder,
        fn_constructor_kwargs={"options": model, "out": str(out), "batch_size": batch_size,
                               "thumbnails": thumbnails},
        batch_size=1,
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus,
        num_gpus=gpus,
    )
    log.info("embedding %d shards on Ray with %d actors", len(shards), actors)
    bar = tqdm(total=len(shards), desc="shards", unit="shard", disable=not progress)
    started, images = time.perf_counter(), 0
    for row in results.iter_rows():
        images += int(row["images"])
        bar.update(1)
        bar.set_postfix(images_per_s=f"{images / (time.perf_counter() - started):.1f}")
    bar.close()


@ray.remote
def _fill_ivf(empty: np.ndarray, ids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """One shard's part of the index: a copy of the trained empty IVF, filled with its rows."""
    index = faiss.deserialize_index(empty)
    index.add_with_ids(vectors, ids)
    return faiss.serialize_index(index)


def merged_ivf(
    factory: str, live_ids: np.ndarray, take: Callable[[np.ndarray], np.ndarray],
    shard_size: int, in_flight: int | None = None,
) -> faiss.Index | None:
    """An :data:`~.store.IndexBuilder` for IVF factories: train once on a sample, fill one copy
    of the empty index per slice of ``shard_size`` ids in Ray tasks (at most ``in_flight`` at
    a time, default two per cluster CPU), merge the copies into one; ``None`` for types that
    do not merge (Flat, HNSW) or too few vectors to train, which the store then handles."""
    dim = take(live_ids[:0]).shape[1]
    if describe_family(new_faiss_index(dim, factory)) != "ivf":
        return None
    try:
        empty = trained_index(factory, dim, live_ids, take)
    except NotTrainableError:
        return None
    started = time.perf_counter()
    blob = ray.put(faiss.serialize_index(empty))
    in_flight = in_flight or 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
    slices = [live_ids[start:start + shard_size] for start in range(0, len(live_ids), shard_size)]
    pending: list[Any] = []
    for ids in slices:  # results merge in order, so the lists hold ids in the store's order
        pending.append(_fill_ivf.remote(blob, ids, take(ids)))
        if len(pending) >= in_flight:
            faiss.merge_into(empty, faiss.deserialize_index(ray.get(pending.pop(0))), False)
    for part in pending:
        faiss.merge_into(empty, faiss.deserialize_index(ray.get(part)), False)
    log.info("filled %s in %d shards on Ray and merged them in %.2f s", factory, len(slices),
             time.perf_counter() - started)
    return empty


def _adopt_merged_ivf(store: IndexStore, options: RayOptions, session: ExitStack) -> None:
    """Give the store a per-shard, merged IVF when it serves none yet (a first build); a store
    already serving a generation merges the new rows into it, as in a single-process build."""
    if (store.manifest["index"] or {}).get("family") != "exact":
        return

    def build(factory: str, live_ids: np.ndarray, take: Callable[[np.ndarray], np.ndarray]
              ) -> faiss.Index | None:
        if describe_family(new_faiss_index(store.dim, factory)) != "ivf":
            return None  # no Ray start for a type the store builds itself
        session.enter_context(ray_session(options))
        return merged_ivf(factory, live_ids, take, options.shard_size)

    store.adopt_index(build)


def build_index_on_ray(
    source: str | Path | Sequence[ImageSource],
    store_path: str | Path,
    model: ModelOptions,
    ray_options: RayOptions | None = None,
    *,
    batch_size: int = 16,
    factory: str = "auto",
    pca_dim: int | None = None,
    thumbnails: bool = True,
    prune: bool = False,
    progress: bool = True,
) -> BuildReport:
    """What :func:`~.build.build_index` does, with the embedding on Ray: plan (skip unchanged
    images), embed the shards not yet on disk, add the shards to the store in source order
    (so items get the same ids as in a single-process build), save, delete the shards."""
    ray_options = ray_options or RayOptions()
    images = discover_images(source) if isinstance(source, str | Path) else list(source)
    store_path = Path(store_path)
    store = open_store(store_path, model.resolve(), factory, pca_dim, background=False)
    report = BuildReport()
    session = ExitStack()  # one local Ray for embedding and index, started when first needed
    try:
        todo = plan_build(images, store, report, prune)
        shards = plan_shards(images, todo, ray_options.shard_size)
        shard_dir = store_path / SHARD_DIR
        shard_dir.mkdir(exist_ok=True)
        missing = [shard for shard in shards if not (shard_dir / shard.name).is_file()]
        if len(missing) < len(shards):
            log.info("%d of %d shards are already embedded", len(shards) - len(missing),
                     len(shards))
        if missing:
            session.enter_context(ray_session(ray_options))
            _embed_shards(missing, shard_dir, model, ray_options, batch_size, thumbnails,
                          progress)
        for shard in tqdm(shards, desc="storing", unit="shard", disable=not progress or not shards):
            chosen, vectors, thumbs, failed = read_shard(shard_dir / shard.name)
            for key, reason in failed.items():
                report.failed[key] = reason
                log.warning("skipped %s: %s", key, reason)
            store_batch(store, chosen, vectors, thumbs if thumbnails else None, report)
        _adopt_merged_ivf(store, ray_options, session)
        finish_build(store, report, images)
        shutil.rmtree(shard_dir)
    finally:
        store.close()
        session.close()
    return report
