"""The duplicates view and the dedup contact sheet, rendered in a real headless Chromium."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from lookalike.index.store import IndexStore
from lookalike.models.embedder import Embedder
from lookalike.service.app import create_app
from lookalike.service.deps import ServiceState
from lookalike.service.settings import Settings

from .conftest import serve_in_thread
from .test_page import CHROMIUM, browser_path  # noqa: F401  (the fixture)

pytestmark = pytest.mark.browser

API_KEY = "page-dup-key"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run",
        "--disable-component-update", "--disable-sync"]


@pytest.fixture
def dup_server(planted_store_path: Path, tmp_path: Path, cache_dir: Path,
               embedder: Embedder) -> Iterator[str]:
    target = tmp_path / "planted"
    shutil.copytree(planted_store_path, target)
    settings = Settings(index=target, cache_dir=cache_dir, api_keys=[API_KEY])
    store = IndexStore.open(target, model_fingerprint=embedder.fingerprint)
    with serve_in_thread(create_app(settings, ServiceState(settings, embedder, store)),
                         settings) as url:
        yield url
    store.close()


def test_keep_one_image_of_a_group_and_remove_the_others(
    dup_server: str, browser_path: str, artifacts: Path  # noqa: F811
) -> None:
    from playwright.sync_api import expect, sync_playwright

    page_one = httpx.get(f"{dup_server}/duplicates", params={"limit": 1}, timeout=120).json()
    first = page_one["groups"][0]
    keys = [item["key"] for item in first["items"]]
    keep = keys[1]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(dup_server)
        page.click("#show-duplicates")
        groups = page.locator("#dup-groups .dup-group")
        expect(groups.first).to_be_visible(timeout=30_000)
        box = page.locator(f'.dup-group[data-anchor="{first["anchor"]}"]')
        expect(box.locator(".dup-tile")).to_have_count(len(keys))
        expect(box.locator("h3")).to_contain_text("weakest pair")
        loaded = box.locator("img").evaluate_all(
            "imgs => imgs.map(i => i.complete && i.naturalWidth)")
        assert all(loaded), loaded
        page.screenshot(path=str(artifacts / "duplicates.png"), full_page=True)

        # Without the API key the removal is refused, and nothing is lost.
        box.locator(f'input[value="{keep}"]').check()
        box.locator(".dup-resolve").click()
        expect(page.locator("#dup-error")).to_contain_text("API", timeout=15_000)
        listed = httpx.get(f"{dup_server}/items", params={"limit": 1000}, timeout=60).json()
        assert set(keys) <= {item["key"] for item in listed["items"]}

        # With it, the other images go and the chosen one stays.
        page.fill("#dup-api-key", API_KEY)
        box.locator(".dup-resolve").click()
        expect(box).to_have_count(0, timeout=15_000)
        expect(page.locator("#dup-summary")).to_contain_text(f"kept {keep}")
        browser.close()
    present = {item["key"] for item in
               httpx.get(f"{dup_server}/items", params={"limit": 1000}, timeout=60).json()["items"]}
    assert keep in present and not (set(keys) - {keep}) & present


def test_contact_sheet_renders_every_group_with_inline_thumbnails(
    planted_store_path: Path, tmp_path: Path, browser_path: str,  # noqa: F811
    run: Callable, artifacts: Path,
) -> None:
    from playwright.sync_api import sync_playwright

    out, sheet = tmp_path / "groups.json", tmp_path / "sheet.html"
    result = run("dedup", planted_store_path, "--out", out, "--sheet", sheet, "--no-progress")
    assert result.exit_code == 0, result.output
    groups = json.loads(out.read_text())["groups"]
    assert groups and "http" not in sheet.read_text()  # self-contained
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path, args=ARGS)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(sheet.as_uri())
        assert page.locator("section.group").count() == len(groups)
        images = page.locator("section.group img")
        assert images.count() == sum(len(g["keys"]) for g in groups)
        widths = images.evaluate_all("imgs => imgs.map(i => i.naturalWidth)")
        assert all(w > 0 for w in widths), widths
        captions = page.locator("section.group").first.locator("figcaption").all_inner_texts()
        assert captions == groups[0]["keys"]
        page.screenshot(path=str(artifacts / "dedup-sheet.png"), full_page=True)
        browser.close()
