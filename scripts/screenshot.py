"""Screenshot of the app (default model, CPU) after a few turns, for the README: assets/screenshot.png.

    python -m scripts.screenshot [--out assets/screenshot.png] [--model default]    (from the repository root)

Starts `python app.py`, chats in headless Debian Chromium (Playwright, no browser download), saves the page.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from tests.served_app import CHROMIUM, CHROMIUM_FLAGS, serve_subprocess

ROOT = Path(__file__).resolve().parent.parent

MESSAGES = ("Hi! What is a good name for a goldfish?", "Why is the sky blue? One sentence, please.")


def take(url: str, out: Path, profile: Path) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1280, "height": 900}, device_scale_factor=1,
        )
        page = context.new_page()
        page.goto(url)
        page.wait_for_selector("#metrics table", timeout=120_000)
        page.get_by_label("System prompt (optional, pinned in the sink tokens)").fill("You are a friendly assistant.")
        for replies, message in enumerate(MESSAGES, start=1):
            page.locator("#message textarea").fill(message)
            page.locator("#message textarea").press("Enter")
            # The status still says the last turn's "Done:" until this one starts: count the replies too.
            page.wait_for_function(
                "(replies) => document.querySelectorAll('#chat .message.bot').length === replies"
                " && document.querySelector('#status').innerText.startsWith('Done:')",
                arg=replies, timeout=300_000,
            )
            page.wait_for_timeout(600)  # let the plot finish drawing
        page.screenshot(path=str(out), full_page=True)
        context.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "assets" / "screenshot.png")
    parser.add_argument("--model", default="default")
    args = parser.parse_args()
    if CHROMIUM is None:
        print("error: no chromium binary (apt-get install chromium)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as scratch:
        env = {"LCKV_MODEL": args.model, "LCKV_MAX_NEW_TOKENS": "48"}
        with serve_subprocess(env, Path(scratch) / "app.log") as url:
            take(url, args.out, Path(scratch) / "profile")
    print(f"saved {args.out} ({args.out.stat().st_size / 1024:.0f} KB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
