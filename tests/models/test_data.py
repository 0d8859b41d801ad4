"""Training data: the three layouts, the shared validation split, augmentation."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.core.pairs import (
    PairsError,
    fold_pairs,
    make_candidate_sets,
    read_pairs,
    split_pairs,
)
from lookalike.models.data import (
    Augment,
    DataError,
    ImageDataset,
    load_class_folders,
    load_labelled_pairs,
    load_tll_pairs,
    split,
)
from lookalike.models.preprocess import Preprocessor


def test_tll_split_is_the_one_evaluation_scores(demo_dir: Path) -> None:
    data = load_tll_pairs(demo_dir / "pairs.csv")
    train, val = split(data, 0.2, foils=19, seed=0)
    pairs = read_pairs(demo_dir / "pairs.csv")
    expected_train, expected_val = split_pairs(pairs, 0.2, seed=0)
    assert val.sets == make_candidate_sets(expected_val, 19, seed=0)
    assert len(train.first) == len(expected_train) == 80
    # Candidate indices point at the files of the keys the sets name.
    for s, query, candidates in zip(val.sets, val.queries, val.candidates, strict=True):
        assert val.images[query] == demo_dir / "left" / f"{s.query}.jpg"
        assert [val.images[c].stem for c in candidates] == list(s.candidates)
        assert val.images[candidates[s.answer]].parent.name == "right"
    assert not set(train.images) & set(val.images), "no held-out image is trained on"
    # One group per training pair: the two images of a pair share a label, no one else does.
    assert (train.labels[train.first] == train.labels[train.second]).all()
    assert len(np.unique(train.labels[train.first])) == len(train.first)


def test_labelled_pairs_group_positives_and_keep_negatives(tmp_path: Path, demo_dir: Path) -> None:
    lefts = sorted((demo_dir / "left").glob("*.jpg"))[:12]
    for path in lefts:
        shutil.copy(path, tmp_path / path.name)
    names = [p.name for p in lefts]
    rows = [(names[i], names[i + 1], 1) for i in range(0, 10, 2)]  # 5 positive pairs
    rows += [(names[0], names[2], 0), (names[1], names[10], 1), (names[4], names[11], 0)]
    with open(tmp_path / "labelled.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["a", "b", "label"])
        writer.writerows(rows)
    data = load_labelled_pairs(tmp_path / "labelled.csv")
    assert data.summary()["positive"] == 6 and data.summary()["negative"] == 2
    train, val = split(data, 0.2, foils=0, seed=0)
    held = set(val.images)
    assert all(p not in held for p in train.images)
    pos = [i for i in range(len(train.first))
           if train.labels[train.first[i]] == train.labels[train.second[i]]]
    assert len(pos) >= 3
    index = {p.name: i for i, p in enumerate(train.images)}
    if names[0] in index and names[2] in index:
        assert train.labels[index[names[0]]] != train.labels[index[names[2]]]


def test_class_folders_pair_images_within_a_class(tmp_path: Path, demo_dir: Path) -> None:
    lefts = sorted((demo_dir / "left").glob("*.jpg"))[:9]
    for number, path in enumerate(lefts):
        folder = tmp_path / f"class{number % 3}"
        folder.mkdir(exist_ok=True)
        shutil.copy(path, folder / path.name)
    data = load_class_folders(tmp_path, seed=0)
    assert len(data.pairs) == 3  # 3 images per class -> one pair each, one image left over
    assert all(a.split("/")[0] == b.split("/")[0] for a, b in data.pairs)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda root: load_tll_pairs(root / "missing.csv"), "does not exist"),
        (lambda root: load_tll_pairs(root / "empty.csv"), "has no pairs"),
        (lambda root: load_tll_pairs(root / "ghost.csv"), "no image for key 'ghost'"),
        (lambda root: load_labelled_pairs(root / "empty.csv"), "needs columns a,b,label"),
        (lambda root: load_class_folders(root / "left"), "no class folder"),
    ],
)
def test_bad_data_raises_one_clear_error(tmp_path: Path, make, message: str) -> None:
    (tmp_path / "left").mkdir()
    (tmp_path / "right").mkdir()
    (tmp_path / "empty.csv").write_text("left,right\n")
    (tmp_path / "ghost.csv").write_text("left,right\nghost,spook\n")
    with pytest.raises(DataError, match=message):
        make(tmp_path)


def test_augment_and_dataset_give_model_inputs(demo_dir: Path) -> None:
    path = next((demo_dir / "left").glob("*.jpg"))
    preprocessor = Preprocessor(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    augment = Augment(224, crop_scale=0.5, flip=1.0, jitter=0.3)
    image = Image.open(path).convert("RGB")
    assert augment(image).size == (224, 224)
    plain = ImageDataset([path], preprocessor)[0]
    augmented = ImageDataset([path], preprocessor, augment)[0]
    assert plain.shape == augmented.shape == (3, 224, 224)
    assert not np.allclose(plain.numpy(), augmented.numpy())
    assert np.allclose(plain.numpy(), preprocessor(image), atol=1e-6), "view 0 = inference input"


def test_cross_validation_folds_validate_every_pair_exactly_once(demo_dir: Path) -> None:
    data = load_tll_pairs(demo_dir / "pairs.csv")
    pairs = read_pairs(demo_dir / "pairs.csv")
    seen: list[tuple[str, str]] = []
    for fold in range(3):
        train, val = split(data, foils=19, seed=4, fold=(fold, 3))
        expected_train, expected_val = fold_pairs(pairs, 3, fold, seed=4)
        assert val.sets == make_candidate_sets(expected_val, 19, seed=4)
        assert len(expected_val) in (33, 34) and len(train.first) == len(expected_train)
        assert not set(train.images) & set(val.images), "no held-out image is trained on"
        seen += expected_val
    assert sorted(seen) == sorted(pairs)
    assert fold_pairs(pairs, 3, 0, seed=4) != fold_pairs(pairs, 3, 0, seed=5)
    for folds, fold in ((1, 0), (3, 3), (101, 0)):
        with pytest.raises(PairsError):
            fold_pairs(pairs, folds, fold)
