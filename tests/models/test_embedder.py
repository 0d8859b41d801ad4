"""Embedder over real demo images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lookalike.models.embedder import Embedder


def test_files_and_bytes_give_the_same_unit_vectors(
    embedder: Embedder, small_image_dir: Path
) -> None:
    paths = sorted(small_image_dir.rglob("*.jpg"))[:5]
    batches = list(embedder.embed_files(paths, batch_size=2))
    vectors = np.concatenate([b.vectors for b in batches])
    assert vectors.shape == (5, embedder.dim)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    one = embedder.embed_bytes(paths[3].read_bytes())
    np.testing.assert_allclose(one, vectors[3], atol=1e-4)


def test_bad_files_are_reported_not_fatal(
    embedder: Embedder, small_image_dir: Path, tmp_path: Path
) -> None:
    good = sorted(small_image_dir.rglob("*.jpg"))[:2]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(good[0].read_bytes()[:300])
    missing = tmp_path / "missing.jpg"
    (batch,) = list(embedder.embed_files([good[0], broken, missing, good[1]], batch_size=8))
    assert batch.indices == [0, 3]
    assert set(batch.errors) == {1, 2}
    assert "truncated" in batch.errors[1].lower()
    assert "cannot read" in batch.errors[2]


def test_look_alike_pairs_score_above_random_pairs(
    embedder: Embedder, demo_dir: Path, demo_pairs: list[tuple[str, str]]
) -> None:
    """The embedding carries the signal the product sells: true pairs are closer than chance."""
    pairs = demo_pairs[:30]
    left = np.stack(
        [embedder.embed_bytes((demo_dir / "left" / f"{a}.jpg").read_bytes()) for a, _ in pairs]
    )
    right = np.stack(
        [embedder.embed_bytes((demo_dir / "right" / f"{b}.jpg").read_bytes()) for _, b in pairs]
    )
    scores = left @ right.T
    true = np.diag(scores)
    others = scores[~np.eye(len(pairs), dtype=bool)]
    assert true.mean() > others.mean() + 0.05
    ranks = (scores >= true[:, None]).sum(1)
    assert ranks.mean() < (len(pairs) + 1) / 2 * 0.6
