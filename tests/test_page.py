"""The page at / in a real headless Chromium (Debian's chromium + Playwright), against a live uvicorn server."""

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

from .test_use import runs  # noqa: F401 -- the module fixture with two trained tiny runs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def live_server(runs):  # noqa: F811
    import uvicorn

    from newstune.serve import create_app, load_served

    port = free_port()
    served = load_served([f"topics={runs['topics']}", f"fake_or_true={runs['binary']}"])
    server = uvicorn.Server(uvicorn.Config(create_app(served), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_page_classifies_a_headline(live_server, tmp_path):
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless=new"])
        page = browser.new_page(viewport={"width": 900, "height": 640})
        page.goto(live_server + "/")
        page.wait_for_selector("#model option", state="attached")
        assert page.locator("#model option").count() == 2
        page.select_option("#model", "topics")
        page.fill("#text", "goal match team coach league")
        page.click("#go")
        page.wait_for_selector("#label")
        assert page.locator("#label").inner_text() in {"sports", "business", "science"}
        assert page.locator(".bar").count() == 3
        page.screenshot(path=str(tmp_path / "page.png"))
        page.select_option("#model", "fake_or_true")
        page.fill("#text", "x" * 6000)
        page.click("#go")
        page.wait_for_selector("#error:not(:empty)")
        assert "limit" in page.locator("#error").inner_text()
        browser.close()
    assert (tmp_path / "page.png").stat().st_size > 5000
    if os.environ.get("NEWSTUNE_SCREENSHOT_DIR"):
        shutil.copy(tmp_path / "page.png", Path(os.environ["NEWSTUNE_SCREENSHOT_DIR"]) / "page_test_screenshot.png")
