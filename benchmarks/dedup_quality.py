"""lookalike's near-duplicate groups against imagededup (PHash, and its CNN method with an
offline backbone) on the same planted set: precision and recall of duplicate pairs, seconds
and peak RSS, each method in a fresh subprocess.

The set is one written by ``lookalike dedup-evaluate`` (``images/`` with ``truth.csv``):
originals with two edited copies each, their TLL look-alike partners (not duplicates) and
unrelated images. imagededup's CNN downloads MobileNetV3 weights from a hub by default, which
this machine cannot reach; it is run through its ``CustomModel`` option with the offline
ImageNet EfficientNet-Lite0 trunk (global average pooling), labelled as such. imagededup is
not a lookalike dependency: ``pip install --no-deps imagededup PyWavelets``.

    python benchmarks/dedup_quality.py --set /tmp/dd/tll-150

lookalike's time includes embedding every image from scratch (a new index) and the dedup.
imagededup reports per-image duplicate lists (its native output); lookalike claims every pair
within a group. The threshold lookalike uses is the model's calibration (or --threshold).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def peak_rss() -> int:
    """This process's peak RSS (VmHWM, not inherited across fork and exec)."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def key_of(name: str) -> str:
    return str(Path(name).with_suffix(""))


def imagededup_pairs(found: dict[str, list]) -> set[tuple[str, str]]:
    pairs = set()
    for name, others in found.items():
        for other in others:
            other = other[0] if isinstance(other, tuple | list) else other
            a, b = sorted((key_of(name), key_of(other)))
            pairs.add((a, b))
    return pairs


def phash_worker(images: Path) -> tuple[set, dict]:
    from imagededup.methods import PHash

    method = PHash(verbose=False)
    encodings = method.encode_images(image_dir=str(images), recursive=True)
    return imagededup_pairs(method.find_duplicates(encoding_map=encodings)), {
        "threshold": "Hamming <= 10 (default)"}


def cnn_worker(images: Path) -> tuple[set, dict]:
    import torch
    from imagededup.methods import CNN
    from imagededup.utils import CustomModel

    from lookalike.models.preprocess import Preprocessor
    from lookalike.models.resolve import default_cache_dir, resolve_model

    model = resolve_model("efficientnet_lite0", default_cache_dir())
    facts = model.facts
    preprocess = Preprocessor(facts.input_size, facts.mean, facts.std)
    net = model.torch_net().eval()

    class Trunk(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    def transform(image):  # noqa: ANN001, ANN202
        return torch.from_numpy(preprocess(image.convert("RGB")))

    method = CNN(verbose=False, model_config=CustomModel(
        name="efficientnet_lite0-imagenet-offline", model=Trunk(), transform=transform))
    encodings = method.encode_images(image_dir=str(images), recursive=True)
    return imagededup_pairs(method.find_duplicates(encoding_map=encodings)), {
        "threshold": "cosine >= 0.9 (default)", "backbone": "EfficientNet-Lite0 ImageNet, offline"}


def lookalike_worker(images: Path, threshold: float | None) -> tuple[set, dict]:
    from lookalike.index.build import build_index
    from lookalike.index.dedup import DedupParams, find_duplicate_groups
    from lookalike.index.store import IndexStore
    from lookalike.models.resolve import ModelOptions, create_embedder

    embedder = create_embedder(ModelOptions.from_env())
    params = DedupParams.from_calibration(embedder.bundle.calibration, threshold=threshold)
    with tempfile.TemporaryDirectory() as work:
        build_index(images, Path(work) / "index", embedder, progress=False)
        store = IndexStore.open(Path(work) / "index", background=False)
        groups = find_duplicate_groups(store, params)
        store.close()
    pairs = {(a, b) for g in groups for i, a in enumerate(sorted(g.keys))
             for b in sorted(g.keys)[i + 1:]}
    weight = params.cosine_weight
    return pairs, {"threshold": f"(keypoints + {weight:g} x cosine) / {1 + weight:g} >= "
                                f"{params.threshold:.2f} (cosine >= "
                                f"{params.candidate_cosine:.2f} candidates)"}


def worker(method: str, images: Path, threshold: float | None) -> dict:
    started = time.perf_counter()
    if method == "phash":
        pairs, info = phash_worker(images)
    elif method == "cnn":
        pairs, info = cnn_worker(images)
    else:
        pairs, info = lookalike_worker(images, threshold)
    seconds = time.perf_counter() - started
    from lookalike.evaluation.dedup import pair_metrics
    from lookalike.evaluation.dedup_set import read_dedup_set

    truth = set(read_dedup_set(images).duplicates)
    return {"method": method, "seconds": seconds, "peak_rss": peak_rss(), **info,
            **pair_metrics(pairs, truth)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--set", type=Path, required=True, help="a dedup-evaluate --out folder")
    parser.add_argument("--methods", default="lookalike,phash,cnn")
    parser.add_argument("--threshold", type=float)
    parser.add_argument("--worker")
    args = parser.parse_args()
    images = args.set / "images"
    if args.worker:
        print(json.dumps(worker(args.worker, images, args.threshold)))
        return
    print("# load average {:.2f} {:.2f} {:.2f} at start".format(*os.getloadavg()))
    rows = []
    for method in args.methods.split(","):
        command = [sys.executable, __file__, "--set", str(args.set), "--worker", method]
        if args.threshold is not None:
            command += ["--threshold", str(args.threshold)]
        out = subprocess.run(command, capture_output=True, text=True, check=False)
        if out.returncode:
            print(f"{method} failed: {out.stderr[-1500:]}")
            continue
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    print("# load average {:.2f} {:.2f} {:.2f} at end".format(*os.getloadavg()))
    print("\n| method | threshold | precision | recall | pairs claimed / true | seconds "
          "| peak RSS |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['method']} | {row['threshold']} | {row['precision']:.3f} | "
              f"{row['recall']:.3f} | {row['claimed']} / {row['true']} | {row['seconds']:.1f} | "
              f"{row['peak_rss'] / 2**20:,.0f} MiB |")


if __name__ == "__main__":
    main()
