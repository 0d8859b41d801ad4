"""The IVF of a Ray build, filled per shard in Ray tasks and merged, against the store's own
build of the same IVF, on the same vectors in one run.

    make demo-index && python benchmarks/ray_merge.py              # the 200 demo images
    python benchmarks/ray_merge.py --index data/photos-index --factory IVF256,SQ8

Both copy the vectors of an existing store (``--index``) into a new store with ``--factory``;
then "store" is ``save`` (train on a sample, add chunk by chunk, tune) and "Ray, merged" is
``adopt_index(merged_ivf)`` on a local Ray with 2 CPUs (the same training, ``add_with_ids`` on
one copy of the empty index per ``--shard-size`` ids in Ray tasks, ``faiss.merge_into``, then
the same tuning and save). Ray's start is timed apart. The CPU model and load average are
printed with the figures: other jobs share this machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from ray_bench import load_average

from lookalike.core.machine import cpu_description
from lookalike.index.ray_build import RayOptions, merged_ivf, ray_session
from lookalike.index.store import IndexStore


def copy_store(source: IndexStore, path: Path, factory: str) -> IndexStore:
    keys = source.keys()
    store = IndexStore.create(path, dim=source.dim, model_fingerprint=source.model_fingerprint,
                              factory=factory, background=False)
    store.add(keys, source.vectors(keys))
    return store


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=Path, default=Path("data/demo-index"))
    parser.add_argument("--factory", default="IVF4,Flat")
    parser.add_argument("--shard-size", type=int, default=48)
    args = parser.parse_args()
    source = IndexStore.open(args.index, background=False)
    print(f"CPU: {cpu_description()}; load average at start: {load_average()}")
    print(f"{len(source)} vectors of dimension {source.dim}, {args.factory}, "
          f"shards of {args.shard_size}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        store = copy_store(source, Path(tmp) / "store", args.factory)
        started = time.perf_counter()
        store.save()
        rows.append(("store (train, add, tune, save)", time.perf_counter() - started, None))
        recall = store.manifest["index"]["recall_at_10"]
        store.close()
        store = copy_store(source, Path(tmp) / "ray", args.factory)
        started = time.perf_counter()
        with ray_session(RayOptions(num_cpus=2)):
            ray_start = time.perf_counter() - started
            timings = {}

            def build(factory, live_ids, take):  # type: ignore[no-untyped-def]
                began = time.perf_counter()
                index = merged_ivf(factory, live_ids, take, args.shard_size)
                timings["merge"] = time.perf_counter() - began
                return index

            began = time.perf_counter()
            info = store.adopt_index(build)
            adopt = time.perf_counter() - began
        store.close()
        rows.append(("Ray, merged (train, fill per shard, merge)", timings["merge"],
                     info["recall_at_10"] if info else None))
        rows.append(("Ray, merged + adopt (check, tune, save)", adopt, None))
        rows.append(("Ray start (local, 2 CPUs)", ray_start, None))
    baseline = rows[0][1]
    print(f"{'step':<44} {'seconds':>8} {'x store':>8}")
    for name, seconds, _ in rows:
        print(f"{name:<44} {seconds:8.3f} {seconds / baseline:8.2f}")
    print(f"recall@10 after tuning: store {recall:.3f}, Ray merged {rows[1][2]:.3f}")
    print(f"load average at end: {load_average()}")
    source.close()


if __name__ == "__main__":
    main()
