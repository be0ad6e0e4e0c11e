"""The demo in a real browser: headless Debian Chromium (``apt-get install chromium``) driven by Playwright, against
the app launched on 127.0.0.1 with the reference VLM. Picks an example, two methods at two budgets, runs, waits for
the grid and checks that every cell shows an answer (marked right / wrong) and an overlay; saves a screenshot
(``VLTOK_DEMO_SCREENSHOT=docs/demo.png`` also writes it there)."""
from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

import pytest

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = os.environ.get("VLTOK_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
METHODS = ("fastv", "tome")   # in the order the checkbox group lists them
BUDGETS = ("0.5", "0.16")

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"no Chromium at {CHROMIUM}: apt-get install chromium (CI's .ci/run does)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url():
    from vltok import demo_core as core
    from vltok.demos import app

    dm = core.DemoModel.load(None, device="cpu", dtype="float32")   # the reference VLM
    demo = app.launch(dm, port=free_port(), block=False, max_new_tokens=8)
    yield demo.local_url
    demo.close()


def _set_checks(page, group: str, wanted):
    for box in page.locator(f"#{group} input[type=checkbox]").all():
        name = box.get_attribute("name")
        if box.is_checked() != (name in wanted):
            box.click()


def test_browser_runs_a_grid(url, tmp_path):
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1360, "height": 1000})
            page.goto(url)
            page.locator("#examples button.thumbnail-item").first.wait_for(timeout=60_000)
            page.locator("#examples button.thumbnail-item").first.click()
            question = page.locator("#question textarea")
            sync_api.expect(question).to_have_value("What color is the star?", timeout=20_000)
            page.locator("#image img").first.wait_for(timeout=20_000)
            _set_checks(page, "methods", METHODS)
            _set_checks(page, "budgets", BUDGETS)
            page.locator("#run").click()
            sync_api.expect(page.locator("#status")).to_contain_text("Done: 4 cells", timeout=240_000)
            cells = page.locator(".vltok-cell")
            sync_api.expect(cells).to_have_count(4, timeout=20_000)
            # the grid re-renders from the last state after the status line: wait until no cell is pending
            sync_api.expect(page.locator(".vltok-ok")).to_have_count(4, timeout=30_000)
            texts = [cells.nth(i).inner_text() for i in range(4)]
            for (m, k), text in zip([(m, k) for m in METHODS for k in BUDGETS], texts):
                assert f"{m} @ {k}" in text and "answer:" in text, text
                assert ("right" in text) != ("wrong" in text), text   # the example knows its answer
                assert "visual tokens" in text and "TTFT" in text, text
            for i in range(4):
                img = cells.nth(i).locator("img").first
                img.wait_for(timeout=20_000)
                page.wait_for_function("el => el.complete && el.naturalWidth > 0", arg=img.element_handle(),
                                       timeout=20_000)
                assert img.evaluate("el => el.naturalWidth") >= 300   # the overlay, not an icon
            assert "after the cuts" in texts[0] and "after the cuts" in texts[1]   # fastv: the per-cut count
            cells.first.scroll_into_view_if_needed()
            shot = tmp_path / "demo.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 20_000
            out = os.environ.get("VLTOK_DEMO_SCREENSHOT")
            if out:
                shutil.copy(shot, out)
        finally:
            browser.close()
