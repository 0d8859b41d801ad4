"""The web page end to end in a real headless Chromium against a real server."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from lookalike.index.store import IndexStore
from lookalike.models.embedder import Embedder
from lookalike.service.app import create_app
from lookalike.service.deps import ServiceState
from lookalike.service.settings import Settings

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(store_copy: Path, cache_dir: Path, embedder: Embedder) -> Iterator[str]:
    port = free_port()
    settings = Settings(index=store_copy, cache_dir=cache_dir, port=port)
    store = IndexStore.open(store_copy, model_fingerprint=embedder.fingerprint)
    app = create_app(settings, ServiceState(settings, embedder, store))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)
    store.close()


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
