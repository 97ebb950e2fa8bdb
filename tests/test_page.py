"""The page at / in a real headless Chromium (Debian's chromium + Playwright), against a live uvicorn server."""

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from newstune.serving.serve import create_app, load_served

from .conftest import make_served
from .test_use import runs  # noqa: F401 -- the module fixture with two trained tiny runs

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def live(app) -> Iterator[str]:
    """The app on a uvicorn server in a thread; yields its base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture
def live_server(runs):  # noqa: F811
    served = load_served([f"topics={runs['topics']}", f"fake_or_true={runs['binary']}"])
    with live(create_app(served)) as url:
        yield url


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
        # the page shows what the API answers for the same text: its label and each class's probability
        api = httpx.post(live_server + "/v1/classify",
                         json={"model": "topics", "texts": ["goal match team coach league"]}).json()["results"][0]
        assert page.locator("#label").inner_text() == api["label"] == "sports"
        assert page.locator(".bar").count() == 3
        widths = page.eval_on_selector_all(".bar", "bars => bars.map(b => parseFloat(b.style.width))")
        assert sorted(widths, reverse=True) == pytest.approx(
            sorted((100 * p for p in api["probabilities"].values()), reverse=True), abs=0.06)
        page.screenshot(path=str(tmp_path / "page.png"))
        page.select_option("#model", "fake_or_true")
        page.fill("#text", "x" * 6000)
        page.click("#go")
        page.wait_for_selector("#error:not(:empty)")
        assert "at most 5000 characters" in page.locator("#error").inner_text()
        browser.close()
    assert (tmp_path / "page.png").stat().st_size > 5000
    if os.environ.get("NEWSTUNE_SCREENSHOT_DIR"):
        shutil.copy(tmp_path / "page.png", Path(os.environ["NEWSTUNE_SCREENSHOT_DIR"]) / "page_test_screenshot.png")


# Run folders are written by whoever trained them: their label and model names must reach the page as text.
PAYLOAD_LABELS = [f"""<img src=x onerror="window.pwned=1;document.title='pwned'">{topic}"""
                  for topic in ("sports", "business", "science")]
PAYLOAD_MODEL = """<img src=y onerror="window.pwned=1">news" onfocus="window.pwned=1"""


def ask_on_page(browser, url: str):
    """The page at `url` after classifying one text through its form, every request settled."""
    page = browser.new_page()
    page.goto(url + "/")
    page.wait_for_selector("#model option", state="attached")
    page.fill("#text", "goal match team")
    page.click("#go")
    page.wait_for_selector("#label")
    page.wait_for_load_state("networkidle")  # an injected <img src=x> would have failed to load by now
    return page


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_page_shows_names_as_text_and_runs_no_script_in_them(tiny_models):
    playwright = pytest.importorskip("playwright.sync_api")
    app = create_app({PAYLOAD_MODEL: make_served(tiny_models["bert"], PAYLOAD_LABELS, name=PAYLOAD_MODEL)})
    with live(app) as url, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless=new"])
        page = ask_on_page(browser, url)
        assert page.evaluate("window.pwned") is None and page.title() == "newstune"
        assert page.locator("#model option").inner_text() == f"{PAYLOAD_MODEL} (3 labels)"
        assert page.locator("#label").inner_text() in PAYLOAD_LABELS
        assert sorted(page.locator(".row .name").all_inner_texts()) == sorted(PAYLOAD_LABELS)
        browser.close()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
def test_page_shows_a_multi_label_answer_as_its_label_set(tiny_models):
    from newstune.decisions.rule import Decision

    playwright = pytest.importorskip("playwright.sync_api")
    served = make_served(tiny_models["bert"], PAYLOAD_LABELS, name="tags")
    # thresholds that put the first two labels on and the third off whatever the probabilities
    served.decision = Decision(multi_label=True, label_thresholds=[0.0, 0.0, 1.01])
    with live(create_app({"tags": served})) as url, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--headless=new"])
        page = ask_on_page(browser, url)
        api = httpx.post(url + "/v1/classify", json={"model": "tags", "texts": ["goal match team"]}).json()
        assert api["results"][0]["labels"] == PAYLOAD_LABELS[:2]
        assert page.locator("#label").inner_text() == ", ".join(PAYLOAD_LABELS[:2])
        assert sorted(page.locator(".row.top .name").all_inner_texts()) == sorted(PAYLOAD_LABELS[:2])
        assert page.locator(".bar").count() == 3
        assert page.evaluate("window.pwned") is None
        browser.close()
