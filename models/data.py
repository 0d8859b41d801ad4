"""Training data: look-alike pairs from three layouts, the fixed validation split, augmentation.

Every source becomes one :class:`PairData` — pairs of image keys with a 0/1 target and the
files behind the keys — so the trainer knows one shape:

* a pairs CSV in the "Totally Looks Like" format (``left,right``; images in two folders),
  every row a look-alike pair;
* a labelled-pairs CSV (``a,b,label``; paths relative to an image root) with 0/1 labels;
* a class-per-folder tree: images of one class are look-alikes, paired within the class.

:func:`split` holds back a validation split exactly as the rest of lookalike scores models:
:func:`~lookalike.core.pairs.split_pairs` over the positive pairs, then
:func:`~lookalike.core.pairs.make_candidate_sets` over the held-out pairs, so the
trainer's validation top-1 is the number ``lookalike evaluate`` and the benchmarks report.
No image of a held-out pair is trained on.
"""

from __future__ import annotations

import csv
import random
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from ..core.files import IMAGE_SUFFIX_ORDER, IMAGE_SUFFIXES
from ..core.pairs import (
    CandidateSet,
    Pair,
    PairsError,
    fold_pairs,
    make_candidate_sets,
    read_pairs,
    split_pairs,
)
from .network import ConfigError
from .preprocess import Preprocessor, decode_image

__all__ = [
    "DataError",
    "PairData",
    "TrainPairs",
    "ValidationSets",
    "Augment",
    "ImageDataset",
    "load_tll_pairs",
    "load_labelled_pairs",
    "load_class_folders",
    "split",
]



class DataError(ConfigError):
    """Training data that is missing, empty or malformed (a configuration the CLI reports in
    one line)."""


@dataclass(frozen=True)
class PairData:
    """Pairs of image keys, a 0/1 target per pair, and the file behind each key.

    Keys of the first and second image live in separate namespaces (the TLL left and right
    folders may reuse a name), hence two path tables.
    """

    pairs: list[Pair]
    targets: list[int]
    first_paths: dict[str, Path]
    second_paths: dict[str, Path]
    source: str

    @property
    def images(self) -> list[Path]:
        """Every image file of the data, once each, in a fixed order: the rows of the one
        feature cache that every split and fold of this data indexes into."""
        return list(dict.fromkeys([*self.first_paths.values(), *self.second_paths.values()]))

    def summary(self) -> dict[str, object]:
        positives = sum(self.targets)
        return {"source": self.source, "pairs": len(self.pairs), "positive": positives,
                "negative": len(self.pairs) - positives}


@dataclass(frozen=True)
class TrainPairs:
    """Training pairs as indices into one image list.

    ``first[i]``, ``second[i]`` are the images of pair ``i``; ``labels[j]`` is image ``j``'s
    group (connected component of the positive pairs): equal labels mean "look alike", so a
    loss can treat every other group in a batch as a negative.
    """

    images: list[Path]
    first: np.ndarray
    second: np.ndarray
    labels: np.ndarray


@dataclass(frozen=True)
class ValidationSets:
    """Held-out pairs as challenge candidate sets, over one image list.

    ``queries[s]`` is the image index of set ``s``'s query, ``candidates[s]`` those of its
    candidates, ``answers[s]`` the position of the true match.
    """

    images: list[Path]
    queries: np.ndarray
    candidates: np.ndarray
    answers: np.ndarray
    sets: list[CandidateSet]


def _check_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(f"{what} {path} {'is not a file' if path.exists() else 'does not exist'}")
    return path


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a key too long to be a file name: no such image either
        return False


def _image_file(folder: Path, key: str) -> Path:
    """``folder/key`` as given, else with the first image suffix that exists."""
    direct = folder / key
    if direct.suffix.lower() in IMAGE_SUFFIXES and _is_file(direct):
        return direct
    for suffix in IMAGE_SUFFIX_ORDER:
        candidate = folder / f"{key}{suffix}"
        if _is_file(candidate):
            return candidate
    raise DataError(f"no image for key {key!r} in {folder}")


def load_tll_pairs(
    csv_path: Path, left_dir: Path | None = None, right_dir: Path | None = None
) -> PairData:
    """A ``left,right`` CSV; images in ``left_dir`` / ``right_dir`` (default: beside the CSV)."""
    csv_path = _check_file(Path(csv_path), "pairs CSV")
    left_dir = Path(left_dir) if left_dir else csv_path.parent / "left"
    right_dir = Path(right_dir) if right_dir else csv_path.parent / "right"
    for folder in (left_dir, right_dir):
        if not folder.is_dir():
            raise DataError(f"image folder {folder} does not exist")
    try:
        pairs = read_pairs(csv_path)
    except PairsError as exc:
        raise DataError(str(exc)) from exc
    return PairData(
        pairs=pairs,
        targets=[1] * len(pairs),
        first_paths={left: _image_file(left_dir, left) for left, _ in pairs},
        second_paths={right: _image_file(right_dir, right) for _, right in pairs},
        source=f"pairs {csv_path}",
    )


def load_labelled_pairs(csv_path: Path, image_root: Path | None = None) -> PairData:
    """An ``a,b,label`` CSV (label 1 = look alike, 0 = not); paths relative to ``image_root``
    (default: the CSV's folder)."""
    csv_path = _check_file(Path(csv_path), "labelled pairs CSV")
    root = Path(image_root) if image_root else csv_path.parent
    pairs, targets, paths = [], [], {}
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            fields = reader.fieldnames or []
            if not {"a", "b", "label"} <= set(fields):
                raise DataError(
                    f"{csv_path} needs columns a,b,label (found: {reprlib.repr(fields)})"
                )
            for line, row in enumerate(reader, start=2):
                a, b, label = ((row[name] or "").strip() for name in ("a", "b", "label"))
                if not a or not b or label not in {"0", "1"}:
                    raise DataError(
                        f"{csv_path} line {line}: need two paths and a label of 0 or 1"
                    )
                for key in (a, b):
                    paths.setdefault(key, _image_file(root, key))
                pairs.append((a, b))
                targets.append(int(label))
    except OSError as exc:  # e.g. no permission
        raise DataError(f"cannot read {csv_path}: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{csv_path} is not a readable UTF-8 CSV: {exc}") from exc
    if not any(targets):
        raise DataError(f"{csv_path} has no positive (label 1) pairs")
    return PairData(pairs, targets, paths, paths, source=f"labelled {csv_path}")


def load_class_folders(root: Path, seed: int = 0) -> PairData:
    """Images under ``root/CLASS/``; each class's images are shuffled (seeded) and paired up.

    Each image appears in one pair, so held-out pairs never share an image with training
    pairs; they may share a class, which then also has training pairs.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"class folder tree {root} does not exist")
    rng = random.Random(seed)
    pairs, paths = [], {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        rng.shuffle(files)
        for a, b in zip(files[0::2], files[1::2], strict=False):
            keys = (f"{folder.name}/{a.name}", f"{folder.name}/{b.name}")
            paths.update(zip(keys, (a, b), strict=True))
            pairs.append(keys)
    if not pairs:
        raise DataError(f"{root} has no class folder with two or more images")
    return PairData(pairs, [1] * len(pairs), paths, paths, source=f"classes {root}")


class _Groups:
    """Union-find over image indices: the connected components of the positive pairs."""

    def __init__(self, n: int) -> None:
        self.parent = list(range(n))

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        self.parent[self.find(a)] = self.find(b)


def split(
    data: PairData, val_fraction: float = 0.2, foils: int = 19, seed: int = 0,
    fold: tuple[int, int] | None = None, hold_out: bool = True,
) -> tuple[TrainPairs, ValidationSets]:
    """Hold out ``val_fraction`` of the positive pairs (seeded) as candidate sets; train on
    every other pair that shares no image with them. ``fold = (k, K)`` holds out fold ``k``
    of a ``K``-fold cross-validation (:func:`~lookalike.core.pairs.fold_pairs`) instead.
    ``hold_out=False`` trains on every pair (a cross-validated recipe's final model); its
    candidate sets are then made of training pairs and measure the fit, not validation."""
    positives = [pair for pair, target in zip(data.pairs, data.targets, strict=True) if target]
    try:
        if not hold_out:
            val = positives
        elif fold is None:
            _, val = split_pairs(positives, val_fraction, seed=seed)
        else:
            _, val = fold_pairs(positives, fold[1], fold[0], seed=seed)
        sets = make_candidate_sets(val, foils, seed=seed)
    except PairsError as exc:
        raise DataError(f"cannot hold out a validation split: {exc}") from exc
    held = ({data.first_paths[a] for a, _ in val} | {data.second_paths[b] for _, b in val}
            if hold_out else set())
    kept = [
        ((a, b), target)
        for (a, b), target in zip(data.pairs, data.targets, strict=True)
        if data.first_paths[a] not in held and data.second_paths[b] not in held
    ]
    if not any(target for _, target in kept):
        raise DataError("no positive training pairs are left after the validation split")

    index: dict[Path, int] = {}

    def image(path: Path) -> int:
        return index.setdefault(path, len(index))

    first = np.array([image(data.first_paths[a]) for (a, _), _ in kept])
    second = np.array([image(data.second_paths[b]) for (_, b), _ in kept])
    groups = _Groups(len(index))
    for i, (_, target) in enumerate(kept):
        if target:
            groups.union(int(first[i]), int(second[i]))
    roots = [groups.find(i) for i in range(len(index))]
    labels = np.unique(roots, return_inverse=True)[1]
    train = TrainPairs(list(index), first, second, labels)

    val_index: dict[Path, int] = {}

    def val_image(path: Path) -> int:
        return val_index.setdefault(path, len(val_index))

    queries = np.array([val_image(data.first_paths[s.query]) for s in sets])
    candidates = np.array([[val_image(data.second_paths[c]) for c in s.candidates] for s in sets])
    answers = np.array([s.answer for s in sets])
    return train, ValidationSets(list(val_index), queries, candidates, answers, sets)


class Augment:
    """Random resized crop, horizontal flip and colour jitter on a PIL image.

    ``crop_scale`` is the smallest fraction of the image area a crop keeps (1 = no crop);
    ``flip`` the flip probability; ``jitter`` the brightness/contrast/saturation strength
    (hue gets a tenth of it). The output is a ``size`` x ``size`` image for the Preprocessor.
    """

    def __init__(self, size: int, crop_scale: float, flip: float, jitter: float) -> None:
        steps: list[object] = []
        if crop_scale < 1.0:
            steps.append(v2.RandomResizedCrop(size, scale=(crop_scale, 1.0), antialias=True))
        if flip > 0:
            steps.append(v2.RandomHorizontalFlip(flip))
        if jitter > 0:
            steps.append(v2.ColorJitter(jitter, jitter, jitter, min(0.5, jitter / 10)))
        self.transform = v2.Compose(steps) if steps else None

    def __call__(self, image: Image.Image) -> Image.Image:
        return self.transform(image) if self.transform else image


class ImageDataset(torch.utils.data.Dataset):
    """Files -> preprocessed ``(3, S, S)`` float tensors, optionally augmented first.

    Decoding goes through :func:`~lookalike.models.preprocess.decode_image`, the one safe
    decoder; a file that fails to decode stops training with its name.
    """

    def __init__(
        self, paths: Sequence[Path], preprocessor: Preprocessor, augment: Augment | None = None
    ) -> None:
        self.paths = list(paths)
        self.preprocessor = preprocessor
        self.augment = augment

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        path = self.paths[index]
        try:
            image = decode_image(path.read_bytes(), draft_size=self.preprocessor.size)
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read training image {path}: {exc}") from exc
        if self.augment is not None:
            image = self.augment(image)
        return torch.from_numpy(self.preprocessor(image))
