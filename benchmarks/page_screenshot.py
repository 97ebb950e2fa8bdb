"""Screenshot of the page at / served by `newstune serve` with real runs (for the README).

    python benchmarks/page_screenshot.py topics=runs/ag_news_minilm_lora fake_or_true=runs/liar_minilm_lora
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import served  # noqa: E402


def main() -> None:
    from playwright.sync_api import sync_playwright

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--text", default="Oil prices jump as OPEC agrees to cut output; airline shares slide")
    parser.add_argument("--out", type=Path, default=Path("docs/page.png"))
    args = parser.parse_args()
    with served(args.runs) as base:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 900, "height": 560})
            page.goto(base + "/")
            page.wait_for_selector("#model option", state="attached")
            page.fill("#text", args.text)
            page.click("#go")
            page.wait_for_selector("#label")
            args.out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(args.out))
            browser.close()
    print(args.out)


if __name__ == "__main__":
    main()
