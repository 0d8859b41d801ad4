"""The command line: real commands on real images; user errors are one line and exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lookalike.index.store import IndexStore


def test_build_search_info(run, small_image_dir: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    result = run("index", "build", small_image_dir, "--out", store, "--batch-size", "8")
    assert result.exit_code == 0, result.output
    assert "24 added" in result.output
    again = run("index", "build", small_image_dir, "--out", store)
    assert "24 unchanged" in again.output

    query = sorted((small_image_dir / "left").glob("*.jpg"))[0]
    result = run("search", query, "--index", store, "-k", "3", "--json")
    assert result.exit_code == 0, result.output
    matches = json.loads(result.output)
    assert matches[0]["key"] == f"left/{query.stem}" and len(matches) == 3

    table = run("search", query, "--index", store, "-k", "2")
    assert f"left/{query.stem}" in table.output

    info = json.loads(run("index", "info", store).output)
    assert info["count"] == 24 and info["metric"] == "cosine"


@pytest.mark.parametrize(
    "args",
    [
        ("index", "build", "no/such/folder", "--out", "x"),
        ("search", "no/such/image.jpg", "--index", "x"),
        ("index", "info", "no/such/store"),
        ("index", "build", ".", "--out", "x", "--model", "not-a-model"),
        ("index", "build", ".", "--out", "x", "--engine", "warp-drive"),
    ],
)
def test_user_errors_are_one_line_exit_2(run, args: tuple[str, ...]) -> None:
    result = run(*args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert lines[-1].startswith("error: ") or "Invalid value" in result.output


def test_search_with_a_non_image(run, small_store_path: Path, tmp_path: Path) -> None:
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    result = run("search", text, "--index", small_store_path)
    assert result.exit_code == 2
    assert result.output.strip() == (
        "error: not an image in a supported format (BMP, GIF, JPEG, PNG, WEBP)"
    )


def test_search_an_index_of_another_model(run, tmp_path: Path, small_image_dir: Path) -> None:
    IndexStore.create(tmp_path / "other", dim=1280, model_fingerprint="0" * 64).close()
    query = next((small_image_dir / "left").glob("*.jpg"))
    result = run("search", query, "--index", tmp_path / "other")
    assert result.exit_code == 2 and "rebuild the index" in result.output


@pytest.mark.parametrize(
    ("args", "text"),
    [
        ((), "index"),
        (("index", "build"), "CSV with a 'path' column"),
        (("search",), "look most like"),
        (("serve",), "Serve the HTTP API"),
        (("demo",), "bundled demo images"),
    ],
)
def test_help_explains(run, args: tuple[str, ...], text: str) -> None:
    result = run(*args, "--help")
    assert result.exit_code == 0 and text in result.output


def test_backbones_lists_the_registry(run) -> None:
    result = run("backbones")
    assert "efficientnet_lite0" in result.output and "torch" in result.output


def test_index_tune_and_migrate(run, tmp_path: Path) -> None:
    from tests.index.test_migration import write_format_1_store

    old = tmp_path / "old"
    keys, _ = write_format_1_store(old, n=30)
    result = run("index", "migrate", old)
    assert result.exit_code == 0, result.output
    assert result.output.strip() == f"{old}: format 2, 30 items"
    assert run("index", "migrate", old).exit_code == 0  # already migrated: nothing to do

    tuned = run("index", "tune", old, "--target-recall", "0.9")
    assert tuned.exit_code == 0, tuned.output
    report = json.loads(tuned.output)
    assert report["recall"] >= 0.9, report
    info = json.loads(run("index", "info", old).output)
    assert info["count"] == 30 and info["index"]["recall_at_10"] == report["recall"]
    assert run("index", "tune", tmp_path / "missing").exit_code == 2
