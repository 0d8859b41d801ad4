"""The web page end to end in a real headless Chromium against a real server."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from lookalike.index.store import IndexStore
from lookalike.models.embedder import Embedder
from lookalike.service.app import create_app
from lookalike.service.deps import ServiceState
from lookalike.service.settings import Settings

from .conftest import serve_in_thread

pytestmark = pytest.mark.browser

CHROMIUM = next(
    (
        path
        for name in ("chromium", "chromium-browser", "google-chrome")
        if (path := shutil.which(name))
    ),
    None,
)


@pytest.fixture(scope="module")
def browser_path() -> str:
    if CHROMIUM is None:
        message = "Chromium is not installed (Debian: apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return CHROMIUM


def test_page_search_by_click_upload_and_error(
    server: str, browser_path: str, small_image_dir: Path, artifacts: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=browser_path,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--no-first-run",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(server)
        expect(page.locator("#status")).to_contain_text("24 images", timeout=15_000)
        gallery = page.locator("#gallery .tile")
        expect(gallery).to_have_count(24)

        # Click a collection image: its look-alikes appear, with cosine scores.
        first_key = gallery.first.get_attribute("data-key")
        gallery.first.click()
        results = page.locator("#results .tile")
        expect(results).to_have_count(10, timeout=15_000)
        keys = results.evaluate_all("tiles => tiles.map(t => t.dataset.key)")
        assert first_key not in keys
        scores = [float(s) for s in page.locator("#results .score").all_inner_texts()]
        assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)

        # Upload a file: the same image comes back first with a score of 1.
        query = sorted((small_image_dir / "right").glob("*.jpg"))[2]
        page.select_option("#k", "5")
        page.set_input_files("#file", str(query))
        expect(results.first).to_have_attribute("data-key", f"right/{query.stem}", timeout=15_000)
        expect(results).to_have_count(5)
        expect(page.locator("#results .score").first).to_have_text("1.000")
        page.screenshot(path=str(artifacts / "page.png"), full_page=True)

        # A file that is not an image: a readable error, no results.
        bad = tmp_path / "notes.png"
        bad.write_text("just text")
        page.set_input_files("#file", str(bad))
        expect(page.locator("#error")).to_contain_text("supported format", timeout=15_000)
        expect(results).to_have_count(0)
        browser.close()


def test_page_filters_and_min_score_slider(
    settings: Settings, embedder: Embedder, browser_path: str, artifacts: Path
) -> None:
    """The filter row and the minimum-score slider narrow the matches, and a bad filter shows
    the server's reason."""
    from playwright.sync_api import expect, sync_playwright

    store = IndexStore.open(settings.index, model_fingerprint=embedder.fingerprint)
    right = [key for key in store.keys() if key.startswith("right/")]
    store.add(right, store.vectors(right), replace=True,
              thumbnails=[store.thumbnail(key) for key in right],
              metadata=[{"side": "right", "n": i} for i in range(len(right))])
    app = create_app(settings, ServiceState(settings, embedder, store))
    with serve_in_thread(app, settings) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=browser_path,
                                             args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        page.goto(url)
        gallery = page.locator("#gallery .tile")
        expect(gallery).to_have_count(24, timeout=15_000)
        expect(page.locator("#filter-fields option")).to_have_count(2)  # side, n
        results = page.locator("#results .tile")

        def keys() -> list[str]:
            return results.evaluate_all("tiles => tiles.map(t => t.dataset.key)")

        page.fill("#filter-field", "side")
        page.fill("#filter-value", "right")
        page.locator("#gallery .tile[data-key^='left/']").first.click()
        expect(results).to_have_count(10, timeout=15_000)
        assert all(key.startswith("right/") for key in keys())

        page.fill("#filter-field", "n")
        page.select_option("#filter-op", "gte")
        page.fill("#filter-value", "6")
        page.locator("#filter-value").dispatch_event("change")
        expect(results).to_have_count(6, timeout=15_000)
        assert set(keys()) == set(right[6:])

        scores = [float(s) for s in page.locator("#results .score").all_inner_texts()]
        floor = round((scores[1] + scores[2]) / 2, 2)  # the slider's step is 0.01
        assert scores[2] < floor < scores[1]  # so exactly two matches stay
        page.locator("#min-score").fill(f"{floor:.2f}")
        expect(page.locator("#min-score-value")).to_have_text(f"{floor:.2f}")
        expect(results).to_have_count(2, timeout=15_000)
        assert set(keys()) < set(right[6:])
        page.screenshot(path=str(artifacts / "page-filters.png"), full_page=True)

        page.fill("#filter-value", "six")
        page.locator("#filter-value").dispatch_event("change")
        expect(page.locator("#error")).to_contain_text("compares numbers", timeout=15_000)
        expect(results).to_have_count(0)
        browser.close()
    store.close()
