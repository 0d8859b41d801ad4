"""``lookalike index build`` end to end, default engine against ``--engine torch``, one run.

Both builds run as the real command in a fresh process (imports, model load and all), on the
same images into a new store each, one after the other; the ratio is their images/s. Then a
per-stage breakdown is measured in this process on the same images, one stage at a time
(single-threaded sums; the build overlaps decoding with the forward pass on other threads):
imports, model load, read + decode, preprocess, forward, thumbnail, hashing, SQLite.

    python benchmarks/build.py                      # 1,000 TLL images from ../shared/tll
    python benchmarks/build.py --images 200 --source demo/tll
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lookalike.core.machine import cpu_description

REPO = Path(__file__).resolve().parents[1]


def pick_images(source: Path, count: int, out: Path) -> Path:
    """``count`` images of ``source`` (left then right), linked into one folder."""
    files = sorted((source / "left").glob("*.jpg")) + sorted((source / "right").glob("*.jpg"))
    if len(files) < count:
        raise SystemExit(f"{source} has only {len(files)} images")
    out.mkdir(parents=True)
    for path in files[:count]:
        (out / f"{path.parent.name}-{path.name}").symlink_to(path.resolve())
    return out


def timed_build(images: Path, store: Path, engine: str, cache_dir: Path) -> float:
    env = {**os.environ, "LOOKALIKE_CACHE_DIR": str(cache_dir)}
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "lookalike.service.cli", "index", "build", str(images),
         "--out", str(store), "--engine", engine],
        check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def import_seconds(engine: str) -> float:
    """What a fresh ``index build`` process spends importing before the first image."""
    code = ("import time; t = time.perf_counter(); import lookalike.service.cli, "
            "lookalike.index.build, lookalike.models.resolve"
            + (", torch" if engine == "torch" else ", onnxruntime")
            + "; print(time.perf_counter() - t)")
    done = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                          text=True)
    return float(done.stdout.strip())


def stages(images: Path, engine: str, cache_dir: Path, batch: int = 16) -> dict[str, float]:
    """Seconds per stage over all images, measured one stage at a time in this process."""
    import numpy as np

    from lookalike.core.files import bytes_sha256
    from lookalike.index.store import IndexStore
    from lookalike.models.preprocess import make_thumbnail
    from lookalike.models.resolve import ModelOptions, create_embedder

    found: dict[str, float] = {}
    started = time.perf_counter()
    embedder = create_embedder(ModelOptions(engine=engine, cache_dir=cache_dir))
    found["model load"] = time.perf_counter() - started
    paths = sorted(images.iterdir())
    started = time.perf_counter()
    datas = [path.read_bytes() for path in paths]
    decoded = [embedder.preprocessor.decode(data) for data in datas]
    found["read + decode"] = time.perf_counter() - started
    started = time.perf_counter()
    arrays = [embedder.preprocessor(image) for image in decoded]
    found["preprocess"] = time.perf_counter() - started
    started = time.perf_counter()
    vectors = np.concatenate([embedder.embed_arrays(np.stack(arrays[i : i + batch]))
                              for i in range(0, len(arrays), batch)])
    found["forward"] = time.perf_counter() - started
    started = time.perf_counter()
    thumbs = [make_thumbnail(image) for image in decoded]
    found["thumbnail"] = time.perf_counter() - started
    started = time.perf_counter()
    digests = [bytes_sha256(data) for data in datas]
    found["hashing"] = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as tmp:
        store = IndexStore.create(Path(tmp) / "s", dim=embedder.dim,
                                  model_fingerprint=embedder.fingerprint, model_name="bench")
        started = time.perf_counter()
        for i in range(0, len(paths), batch):
            store.add([p.stem for p in paths[i : i + batch]], vectors[i : i + batch],
                      paths=[str(p) for p in paths[i : i + batch]], sha256=digests[i : i + batch],
                      thumbnails=thumbs[i : i + batch])
        store.save()
        found["SQLite + index"] = time.perf_counter() - started
        store.close()
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=REPO.parent / "shared" / "tll")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--engine", default="onnx-int8", help="The default engine.")
    parser.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "lookalike")
    args = parser.parse_args()
    print(f"CPU: {cpu_description()}; load before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory(prefix="lookalike-build-bench-") as tmp:
        images = pick_images(args.source, args.images, Path(tmp) / "images")
        # Warm the conversion cache and the page cache, so neither build pays for them.
        timed_build(images, Path(tmp) / "warm", args.engine, args.cache_dir)
        walls = {engine: timed_build(images, Path(tmp) / engine, engine, args.cache_dir)
                 for engine in (args.engine, "torch")}
        rates = {engine: args.images / wall for engine, wall in walls.items()}
        print(f"\n| `index build` of {args.images} images | wall s | images/s | ratio |")
        print("|---|---|---|---|")
        for engine, wall in walls.items():
            print(f"| `--engine {engine}` | {wall:.1f} | {rates[engine]:.1f} | "
                  f"{rates[engine] / rates['torch']:.2f}x |")
        print(f"\n| stage (s, over {args.images} images, one at a time) | "
              + " | ".join(walls) + " |")
        print("|---|" + "---|" * len(walls))
        rows: dict[str, list[float]] = {"imports": [import_seconds(e) for e in walls]}
        for engine in walls:
            for name, seconds in stages(images, engine, args.cache_dir).items():
                rows.setdefault(name, []).append(seconds)
        for name, values in rows.items():
            print(f"| {name} | " + " | ".join(f"{v:.2f}" for v in values) + " |")
    print(f"\nload after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
