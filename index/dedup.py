"""Near-duplicate groups in an index store: candidate pairs by k-NN, a keypoint check, union-find.

Why two stages: the embedding was trained to pull *look-alikes* together, so a high cosine
alone cannot tell a re-saved copy from a different photo that looks like it (issue 13 measured
0.93 precision at cosine 0.7). The embedding still finds every copy among its neighbours
cheaply, so it proposes candidate pairs (k-NN over the store in batches, cosine >=
``candidate_cosine``) and a second signal decides: SIFT keypoints of the two stored thumbnails
matched under one similarity transform (RANSAC), mirrored too, so that a flipped copy matches.
A copy keeps its local structure in place; a look-alike shares the gist, not the keypoints.
The pair's score blends the two (:func:`duplicate_score`): a heavily edited copy (rotated and
re-compressed) keeps few matching keypoints but a high cosine, while a look-alike that happens
to share a few keypoints has a low one. Items stored without a thumbnail are judged by cosine
alone at ``cosine_only_threshold``. The weight and both thresholds are chosen by
cross-validation (``evaluation/dedup.py``) and stored in the model's calibration.

Memory grows with the store, never N x N: the keys, one batch of query vectors and results,
the candidate pairs (at most k per item) and the keypoints of every item in a candidate pair
(about 77 KB each, held for the whole pass: 100k such items would need ~8 GB; judging the
pairs in blocks through a bounded :class:`KeypointCache` is the next step at that scale).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy.sparse import coo_array
from scipy.sparse.csgraph import connected_components
from tqdm import tqdm

from ..core.errors import InvalidInputError
from ..core.files import atomic_write
from ..models.preprocess import decode_image
from .store import IndexStore

__all__ = [
    "DEFAULT_DEDUP",
    "DedupParams",
    "DuplicateGroup",
    "KeypointCache",
    "candidate_pairs",
    "check_output_name",
    "find_duplicate_groups",
    "keypoint_signature",
    "duplicate_score",
    "keypoint_similarity",
    "write_groups",
]

KEYPOINTS = 300
"""SIFT keypoints kept per thumbnail (a 192-pixel thumbnail rarely has more worth keeping)."""
MIN_KEYPOINTS = 20
"""The smallest denominator of the inlier share: an image with few keypoints (a flat graphic)
cannot reach a high score from a handful of chance matches."""
RATIO_TEST = 0.8
RANSAC_PIXELS = 4.0


@dataclass(frozen=True)
class DedupParams:
    """How pairs are proposed and judged; ``threshold`` applies to :func:`duplicate_score`
    (the share of keypoints one transform maps onto each other, blended with the cosine at
    ``cosine_weight``)."""

    threshold: float = 0.42
    candidate_cosine: float = 0.3
    cosine_only_threshold: float = 0.84
    k: int = 10
    cosine_weight: float = 0.0

    def __post_init__(self) -> None:
        for name in ("threshold", "candidate_cosine", "cosine_only_threshold"):
            value = getattr(self, name)
            if not -1.0 <= value <= 1.0:
                raise InvalidInputError(f"{name} must be within [-1, 1], got {value}")
        if not 1 <= self.k <= 1000:
            raise InvalidInputError(f"k must be within [1, 1000], got {self.k}")
        if not 0.0 <= self.cosine_weight <= 10.0:
            raise InvalidInputError(
                f"cosine_weight must be within [0, 10], got {self.cosine_weight}")

    @classmethod
    def from_calibration(cls, calibration: dict[str, Any] | None, **override: Any) -> DedupParams:
        """The parameters stored under ``dedup`` in a model's calibration (the defaults when
        it has none), with ``override`` values that are not None on top."""
        stored = dict((calibration or {}).get("dedup") or {})
        known = {name: stored[name] for name in cls.__dataclass_fields__ if name in stored}
        known.update({name: value for name, value in override.items() if value is not None})
        return cls(**known)


DEFAULT_DEDUP = DedupParams()


@dataclass(frozen=True)
class DuplicateGroup:
    """Keys that are near-duplicates of each other (connected by judged pairs), in insertion
    order; ``pairs`` are the accepted pairs ``(a, b, score, cosine)`` that connect them."""

    keys: list[str]
    pairs: list[tuple[str, str, float, float]] = field(default_factory=list)

    @property
    def score(self) -> float:
        """The weakest accepted link: how sure the group is as a whole."""
        return min(score for _, _, score, _ in self.pairs)

    def to_dict(self) -> dict[str, Any]:
        return {"keys": self.keys, "score": round(self.score, 4),
                "pairs": [{"a": a, "b": b, "score": round(s, 4), "cosine": round(c, 4)}
                          for a, b, s, c in self.pairs]}


def candidate_pairs(
    store: IndexStore, keys: Sequence[str], floor: float, k: int = 10, batch_size: int = 1024,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``(i, j, cosine)`` of positions in ``keys`` (``i < j``) whose cosine is at least
    ``floor`` among each item's ``k`` nearest neighbours, through the store's own search in
    batches; each pair once."""
    position = {key: i for i, key in enumerate(keys)}
    firsts, seconds, cosines = [], [], []  # one numpy block per batch: 20 bytes a pair
    with tqdm(total=len(keys), desc="neighbours", unit="item", disable=not progress) as bar:
        for start in range(0, len(keys), batch_size):
            batch = list(keys[start:start + batch_size])
            vectors = store.vectors(batch)
            found = [(start + offset, position.get(match.key, -1), match.score)
                     for offset, matches in enumerate(store.search(vectors, k + 1))
                     for match in matches]
            if found:
                i, j, score = (np.array(column) for column in zip(*found, strict=True))
                keep = (j >= 0) & (j != i) & (score >= floor)
                firsts.append(np.minimum(i, j)[keep])
                seconds.append(np.maximum(i, j)[keep])
                cosines.append(score[keep].astype(np.float32))
            bar.update(len(batch))
    if not firsts or not sum(len(block) for block in firsts):
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.float32)
    width = np.int64(len(keys))
    codes = np.concatenate(firsts).astype(np.int64) * width + np.concatenate(seconds)
    unique, index = np.unique(codes, return_index=True)  # each pair once, sorted by (i, j)
    return unique // width, unique % width, np.concatenate(cosines)[index]


@dataclass(frozen=True)
class Keypoints:
    """SIFT keypoints of a thumbnail and of its mirror image: positions and descriptors."""

    points: tuple[np.ndarray, np.ndarray]
    descriptors: tuple[np.ndarray | None, np.ndarray | None]

    @property
    def count(self) -> int:
        return 0 if self.descriptors[0] is None else len(self.descriptors[0])


BORDER_STD = 3.0
"""Rows and columns at the edges flatter than this (grey levels) are a letterbox or a frame."""


def _trim_borders(grey: np.ndarray) -> np.ndarray:
    """``grey`` without flat bars at its edges: the corners where a black letterbox meets the
    picture match between any two letterboxed images, so they must not count as evidence."""
    rows = np.flatnonzero(grey.std(axis=1) > BORDER_STD)
    cols = np.flatnonzero(grey.std(axis=0) > BORDER_STD)
    if len(rows) < 16 or len(cols) < 16:
        return grey
    return np.ascontiguousarray(grey[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1])


def keypoint_signature(thumbnail: bytes) -> Keypoints:
    """The thumbnail's SIFT keypoints, as is and mirrored (so that a flipped copy matches)."""
    import cv2

    grey = _trim_borders(np.asarray(decode_image(thumbnail).convert("L"), np.uint8))
    sift = cv2.SIFT_create(nfeatures=KEYPOINTS)
    points, descriptors = [], []
    for image in (grey, np.ascontiguousarray(grey[:, ::-1])):
        found, described = sift.detectAndCompute(image, None)
        points.append(np.array([p.pt for p in found], np.float32).reshape(-1, 2))
        descriptors.append(None if described is None else described.astype(np.uint8))
    return Keypoints((points[0], points[1]), (descriptors[0], descriptors[1]))


def keypoint_similarity(a: Keypoints, b: Keypoints) -> float:
    """The share of keypoints that one similarity transform (shift, scale, rotation) maps onto
    each other, after Lowe's ratio test and RANSAC; the better of ``b`` as is and mirrored.

    A copy that was resized, cropped, re-compressed, recoloured or slightly rotated keeps most
    of its local structure in place; a look-alike shares the gist but not the keypoints."""
    import cv2

    if a.descriptors[0] is None or a.count < 2:
        return 0.0
    matcher = cv2.BFMatcher(cv2.NORM_L2)
    best = 0
    for points, descriptors in zip(b.points, b.descriptors, strict=True):
        if descriptors is None or len(descriptors) < 2:
            continue
        pairs = matcher.knnMatch(a.descriptors[0].astype(np.float32),
                                 descriptors.astype(np.float32), k=2)
        good = [m[0] for m in pairs if len(m) == 2 and m[0].distance < RATIO_TEST * m[1].distance]
        if len(good) < 3:
            continue
        source = a.points[0][[m.queryIdx for m in good]]
        target = points[[m.trainIdx for m in good]]
        cv2.setRNGSeed(0)  # RANSAC samples at random: the same pair must get the same score
        _, inliers = cv2.estimateAffinePartial2D(
            source, target, method=cv2.RANSAC, ransacReprojThreshold=RANSAC_PIXELS,
            maxIters=4000, confidence=0.999)
        if inliers is not None:
            best = max(best, int(inliers.sum()))
    return min(1.0, best / max(min(a.count, b.count), MIN_KEYPOINTS))


def duplicate_score(keypoint: Any, cosine: Any, cosine_weight: float) -> Any:
    """``(keypoint + w * cosine) / (1 + w)``: the keypoint share, pulled towards the cosine by
    the weight ``w`` (0 = keypoints alone); floats or arrays alike."""
    return (keypoint + cosine_weight * cosine) / (1.0 + cosine_weight)


class KeypointCache:
    """Keypoints of recently seen thumbnails, by the thumbnail's digest (so a replaced image
    is never judged by its predecessor's keypoints); least recently used go first.

    Why: a service answers ``/duplicates`` page after page over the same images, and finding
    keypoints is most of a request's time. About 80 KB an entry."""

    def __init__(self, size: int = 2000) -> None:
        self.size = size
        self._entries: OrderedDict[bytes, Keypoints] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, thumbnail: bytes) -> Keypoints:
        digest = hashlib.blake2b(thumbnail, digest_size=16).digest()
        with self._lock:
            if digest in self._entries:
                self._entries.move_to_end(digest)
                return self._entries[digest]
        found = keypoint_signature(thumbnail)
        with self._lock:
            self._entries[digest] = found
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)
        return found


def _signatures(store: IndexStore, keys: Sequence[str], cache: KeypointCache | None,
                progress: bool = False) -> dict[str, Keypoints | None]:
    """Keypoints of ``keys`` (None for one whose thumbnail is gone since it was asked for)."""
    signatures: dict[str, Keypoints | None] = {}
    for key in tqdm(keys, desc="keypoints", unit="img", disable=not progress or not keys):
        data = store.thumbnail(key)
        if not data:
            signatures[key] = None
        else:
            signatures[key] = cache.get(data) if cache else keypoint_signature(data)
    return signatures


def judge_pairs(
    store: IndexStore, keys: Sequence[str], first: np.ndarray, second: np.ndarray,
    cosines: np.ndarray, params: DedupParams, progress: bool = False,
    cache: KeypointCache | None = None,
) -> list[tuple[int, int, float, float]]:
    """The candidate pairs that are duplicates, as ``(i, j, score, cosine)`` in candidate
    order: the :func:`duplicate_score` decides where both items have thumbnails, the cosine
    where one has none. Pairs judged by cosine alone are filtered in numpy, so a store of
    vectors without thumbnails (millions of candidate pairs) never becomes Python objects."""
    involved = np.unique(np.concatenate([first, second]))
    shown = store.with_thumbnails([keys[int(i)] for i in involved])
    has_thumbnail = np.zeros(len(keys), bool)
    has_thumbnail[[int(i) for i in involved if keys[int(i)] in shown]] = True
    both = has_thumbnail[first] & has_thumbnail[second]
    by_cosine = np.flatnonzero(~both & (cosines >= params.cosine_only_threshold))
    judged = [(int(n), (int(first[n]), int(second[n]), float(cosines[n]), float(cosines[n])))
              for n in by_cosine]
    pairs = np.flatnonzero(both)
    signatures = _signatures(store, sorted({keys[int(i)] for i in np.concatenate(
        [first[pairs], second[pairs]])}), cache, progress)
    for n in pairs.tolist():
        i, j, cosine = int(first[n]), int(second[n]), float(cosines[n])
        a, b = signatures[keys[i]], signatures[keys[j]]
        if a is None or b is None:  # replaced without a thumbnail meanwhile: cosine decides
            score, threshold = cosine, params.cosine_only_threshold
        else:
            score = duplicate_score(keypoint_similarity(a, b), cosine, params.cosine_weight)
            threshold = params.threshold
        if score >= threshold:
            judged.append((n, (i, j, score, cosine)))
    return [pair for _, pair in sorted(judged)]


def group_pairs(
    keys: Sequence[str], accepted: Sequence[tuple[int, int, float, float]]
) -> list[DuplicateGroup]:
    """Connected components of the accepted pairs (union-find through SciPy's sparse graph),
    each in insertion order, ordered by their earliest member: an added item can join a group
    or start one at the end, never move a group that was there before."""
    if not accepted:
        return []
    rows = np.array([a for a, _, _, _ in accepted], np.int64)
    cols = np.array([b for _, b, _, _ in accepted], np.int64)
    graph = coo_array((np.ones(len(rows), np.int8), (rows, cols)), shape=(len(keys), len(keys)))
    _, labels = connected_components(graph, directed=False)
    members: dict[int, list[int]] = {}
    for position in np.unique(np.concatenate([rows, cols])).tolist():
        members.setdefault(int(labels[position]), []).append(position)
    links: dict[int, list[tuple[str, str, float, float]]] = {}
    for i, j, score, cosine in accepted:
        links.setdefault(int(labels[i]), []).append((keys[i], keys[j], score, cosine))
    ordered = sorted(members.items(), key=lambda item: item[1][0])
    return [DuplicateGroup([keys[p] for p in positions], sorted(links[label]))
            for label, positions in ordered]


def find_duplicate_groups(
    store: IndexStore, params: DedupParams = DEFAULT_DEDUP, *, batch_size: int = 1024,
    progress: bool = False, cache: KeypointCache | None = None,
) -> list[DuplicateGroup]:
    """The store's near-duplicate groups, ordered by their earliest-added member."""
    keys = store.keys()
    first, second, cosines = candidate_pairs(
        store, keys, params.candidate_cosine, params.k, batch_size, progress)
    accepted = judge_pairs(store, keys, first, second, cosines, params, progress, cache)
    return group_pairs(keys, accepted)


def check_output_name(path: Path) -> str:
    """The output format by suffix (``.json`` or ``.csv``); checked before any work is done."""
    suffix = path.suffix.lower()
    if suffix not in (".json", ".csv"):
        raise InvalidInputError(f"--out must end in .json or .csv, not {path.name!r}")
    return suffix


def write_groups(groups: Sequence[DuplicateGroup], params: DedupParams, path: Path) -> Path:
    """Write ``groups`` as JSON (``{params, groups}``) or, for a ``.csv`` path, one row per
    item (``group, key, size, score``) for a spreadsheet; atomically."""
    if check_output_name(path) == ".csv":
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["group", "key", "size", "score"])
        for number, group in enumerate(groups, start=1):
            writer.writerows([number, key, len(group.keys), f"{group.score:.4f}"]
                             for key in group.keys)
        return atomic_write(path, text.getvalue())
    document = {"params": asdict(params), "groups": [group.to_dict() for group in groups]}
    return atomic_write(path, json.dumps(document, indent=2) + "\n")
