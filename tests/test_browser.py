"""The page in a real headless Chromium (Debian's, driven by Playwright): stream a reply, watch the metrics.

Needs `apt-get install chromium` and `pip install playwright` (no `playwright install`: the system
Chromium is used). Skipped, saying why, only when one of them is missing.
"""

from __future__ import annotations

import time

import pytest

from served_app import CHROMIUM, CHROMIUM_FLAGS, serve_in_process

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")

REPLY_TOKENS = 150

# Records every text the last bot message and the metrics table show, as the DOM changes.
RECORD = """() => {
  window.seen = {chat: [], metrics: []};
  const text = (selector) => (document.querySelector(selector) || {}).innerText || "";
  const lastBot = () => { const all = document.querySelectorAll('#chat .message.bot'); return all.length ? all[all.length - 1].innerText : ""; };
  new MutationObserver(() => {
    const status = text('#status');
    window.seen.chat.push([status, lastBot()]);
    window.seen.metrics.push([status, text('#metrics')]);
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


@pytest.fixture(scope="module")
def served():
    with serve_in_process(model="tiny-random", window=64) as server:
        yield server


@pytest.fixture
def page(tmp_path):
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context.new_page()
        finally:
            context.close()


def set_number(page, label: str, value: str) -> None:
    box = page.get_by_label(f"number input for {label}")
    box.fill(value)
    box.press("Enter")


def test_a_reply_streams_into_the_page_and_the_metrics_follow(served, page, tmp_path):
    chat_app, url, _ = served
    page.goto(url)
    page.wait_for_selector("#metrics table", timeout=60_000)
    assert "CPU (no GPU)" in page.inner_text("#metrics") and len(chat_app.registry) == 1
    # Greedy decoding of "hello" never ends on the tiny model, so the reply is exactly REPLY_TOKENS long.
    set_number(page, "Temperature", "0")
    set_number(page, "Max new tokens", str(REPLY_TOKENS))
    page.evaluate(RECORD)
    page.locator("#message textarea").fill("hello")
    page.locator("#message textarea").press("Enter")
    page.wait_for_function("document.querySelector('#status').innerText.startsWith('Done:')", timeout=120_000)

    seen = page.evaluate("window.seen")
    partial = {reply for status, reply in seen["chat"] if status.startswith("Streaming") and reply}
    live_metrics = {table for status, table in seen["metrics"] if status.startswith("Streaming")}
    assert len(partial) > 1, "the reply did not stream"
    assert len(live_metrics) > 1, "the metrics panel did not update while the reply streamed"
    session = next(iter(chat_app.registry._entries.values())).session
    assert f"{REPLY_TOKENS} tokens" in page.inner_text("#status")
    assert f"{session.stats().conversation_tokens:,}" in page.inner_text("#metrics")
    assert page.locator("#latency canvas, #latency svg").count() > 0

    shot = tmp_path / "app.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000

    # Closing the tab frees its session on the server.
    page.close()
    deadline = time.monotonic() + 30
    while len(chat_app.registry) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(chat_app.registry) == 0


def test_stop_while_reading_a_long_paste_puts_it_back_in_the_box(served, page):
    """The engine drops a message it was stopped reading; the page gets it back through restore_draft."""
    paste = "The quick brown fox jumps over the lazy dog. " * 2900  # ~100k tokens, read in chunks
    page.goto(served.url)
    page.wait_for_selector("#metrics table", timeout=60_000)
    session = next(iter(served.app.registry._entries.values())).session
    # Reading lasts until Stop lands (a page slow to click under load could otherwise land it after
    # the reading ended): from the second chunk on, the engine's reader waits for the session's stop
    # flag (this test is the engine's only user).
    bucket = next(iter(served.app.engine._buckets.values()))  # the default shape, built at start
    read_chunk, chunks = bucket.prefill, []

    def read_until_stopped(index, token_ids):
        chunks.append(len(chunks))
        if len(chunks) > 1:
            session._stop.wait(timeout=60)
        return read_chunk(index, token_ids)

    bucket.prefill = read_until_stopped
    try:
        box = page.locator("#message textarea")
        box.fill(paste)
        box.press("Enter")
        page.wait_for_function("document.querySelector('#status').innerText.includes('Reading your message:')",
                               timeout=60_000)
        assert box.input_value() == ""
        page.locator("#stop").click()
        try:
            page.wait_for_function("document.querySelector('#status').innerText.includes('stopped while reading')",
                                   timeout=60_000)
        except sync_api.TimeoutError:
            raise AssertionError(f"status: {page.inner_text('#status')!r}") from None
        assert 1 < len(chunks) < 10  # stopped early in the reading, not after it
        page.wait_for_function("(text) => document.querySelector('#message textarea').value === text", arg=paste,
                               timeout=10_000)
        assert page.locator("#chat .message.user").count() == 0
    finally:
        bucket.prefill = read_chunk  # the app serves the module's other tests
