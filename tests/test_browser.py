"""The page in a real headless Chromium (Debian's, driven by Playwright): stream a reply, watch the metrics.

Needs `apt-get install chromium` and `pip install playwright` (no `playwright install`: the system
Chromium is used). Skipped, saying why, only when one of them is missing.
"""

from __future__ import annotations

import re
import time

import pytest

from app_support.chat_view import LATEST, MAX_SHOWN, PAGE
from app_support.handlers import SCRIPT
from served_app import CHROMIUM, CHROMIUM_FLAGS, fill_transcript, serve_in_process

sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (apt-get install chromium)")

REPLY_TOKENS = 150

# Records every text the last bot message and the metrics table show, and whether Stop shows, as the DOM changes.
RECORD = """() => {
  window.seen = {chat: [], metrics: [], stop: []};
  const text = (selector) => (document.querySelector(selector) || {}).innerText || "";
  const lastBot = () => { const all = document.querySelectorAll('#chat .message.bot'); return all.length ? all[all.length - 1].innerText : ""; };
  const stopShown = () => { const stop = document.querySelector('#stop'); return !!stop && stop.offsetParent !== null; };
  new MutationObserver(() => {
    const status = text('#status');
    window.seen.chat.push([status, lastBot()]);
    window.seen.metrics.push([status, text('#metrics')]);
    window.seen.stop.push([status, stopShown()]);
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""
DONE = "document.querySelector('#status').innerText.startsWith('Done:')"


@pytest.fixture(scope="module")
def served():
    with serve_in_process(model="tiny-random", window=64) as server:
        yield server


@pytest.fixture
def browser(tmp_path):
    """Opens pages, each in a browser of its own (a profile of its own: its own localStorage)."""
    with sync_api.sync_playwright() as playwright:
        contexts = []

        def new_page():
            contexts.append(playwright.chromium.launch_persistent_context(
                str(tmp_path / f"profile-{len(contexts)}"), executable_path=CHROMIUM, headless=True,
                args=CHROMIUM_FLAGS, viewport={"width": 1400, "height": 1000},
            ))
            return contexts[-1].new_page()

        try:
            yield new_page
        finally:
            for context in contexts:
                context.close()


@pytest.fixture
def page(browser):
    return browser()


def set_number(page, label: str, value: str) -> None:
    box = page.get_by_label(f"number input for {label}")
    box.fill(value)
    box.press("Enter")


def test_a_reply_streams_into_the_page_and_the_metrics_follow(served, page, tmp_path):
    chat_app, url, _ = served
    page.goto(url)
    page.wait_for_selector("#metrics table", timeout=60_000)
    assert "CPU (no GPU)" in page.inner_text("#metrics") and len(chat_app.registry) == 1
    assert not page.locator("#stop").is_visible()  # nothing runs yet
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
    # Stop shows while the reply streams, and only then.
    # (the page applies the button's update after the status line's: under load a snapshot may lag)
    streaming = [shown for status, shown in seen["stop"] if status.startswith("Streaming")]
    assert any(streaming)
    page.wait_for_function("!document.querySelector('#stop') || document.querySelector('#stop').offsetParent === null",
                           timeout=10_000)
    session = next(iter(chat_app.registry._entries.values())).session
    # The empty seed box means "draw one per conversation" (a number box sent 0: one seed for all).
    assert page.locator("#seed input, #seed textarea").first.input_value() == "" and session.seed is None
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


def test_stop_while_reading_a_long_paste_puts_it_back_in_the_box(served, page, request):
    """The engine drops a message it was stopped reading; the page gets it back through restore_draft."""
    paste = "The quick brown fox jumps over the lazy dog. " * 2900  # ~100k tokens, read in chunks
    page.goto(served.url)
    page.wait_for_selector("#metrics table", timeout=60_000)
    session = next(iter(served.app.registry._entries.values())).session
    # Reading lasts until Stop lands (a page slow to click under load could otherwise land it after
    # the reading ended): from the second chunk on, the engine waits for the session's stop flag.
    engine = served.app.engine
    read_chunk, chunks = engine._prefill_chunk, []

    def read_until_stopped(stepped: bool):
        if engine._prefills:
            chunks.append(len(chunks))
            if len(chunks) > 1:
                session._stop.wait(timeout=60)
        read_chunk(stepped)

    engine._prefill_chunk = read_until_stopped
    request.addfinalizer(lambda: vars(engine).pop("_prefill_chunk"))
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


def only_session(served):
    return next(iter(served.app.registry._entries.values())).session


def test_examples_edits_the_trash_icon_and_an_empty_send_follow_the_chat_conventions(served, page):
    page.goto(served.url)
    page.wait_for_selector("#metrics table", timeout=60_000)
    session = only_session(served)
    # An empty Send: a notice in the status line, no red "Error" badge anywhere.
    page.locator("#message textarea").press("Enter")
    page.wait_for_function("document.querySelector('#status').innerText.includes('the message is empty')",
                           timeout=30_000)
    assert page.get_by_text("Error", exact=True).count() == 0 and session.messages == []
    # An example prompt in the empty chat is sent as it is.
    set_number(page, "Max new tokens", "8")
    page.locator("#chat button", has_text=SCRIPT[0]).click()
    page.wait_for_function(DONE, timeout=60_000)
    page.locator("#message textarea").fill("second message")
    page.locator("#message textarea").press("Enter")
    page.wait_for_function(DONE + " && document.querySelectorAll('#chat .message.user').length == 2", timeout=60_000)
    assert [m["content"] for m in session.messages[::2]] == [SCRIPT[0], "second message"]
    # Editing the first message takes the conversation back to it.
    page.locator("#chat .message.user").first.hover()
    page.locator("#chat button[aria-label='Edit']").first.click()
    page.locator("#chat textarea").first.fill("an edited first message")
    page.locator("#chat button[aria-label='Submit']").click()
    page.wait_for_function(DONE + " && document.querySelectorAll('#chat .message.user').length == 1", timeout=60_000)
    assert [m["content"] for m in session.messages[::2]] == ["an edited first message"] and len(session.messages) == 2
    assert page.inner_text("#chat .message.user") == "an edited first message"
    # The chat's own trash icon clears the conversation on the server, not only on the page.
    page.locator("#chat button[aria-label='Clear']").click()
    page.wait_for_function("document.querySelector('#status').innerText === 'New conversation.'", timeout=30_000)
    assert session.messages == [] and session.metrics.last_turn is None


def test_a_2000_turn_conversation_opens_at_its_latest_messages_and_scrolls_back(served, page):
    """The first 2,000 turns are written into the page's session (served_app.fill_transcript); the
    2,001st goes through the page, which then shows the conversation as it shows any."""
    page.goto(served.url)
    page.wait_for_selector("#metrics table", timeout=60_000)
    fill_transcript(only_session(served), 2000)
    set_number(page, "Max new tokens", "1")
    page.locator("#message textarea").fill("turn 2000")
    page.locator("#message textarea").press("Enter")
    page.wait_for_function(DONE, timeout=60_000)
    users, replies = page.locator("#chat .message.user"), page.locator("#chat .message.bot")
    assert users.count() == replies.count() == LATEST // 2 and users.last.inner_text() == "turn 2000"
    assert users.first.inner_text() == f"turn {2001 - LATEST // 2}"
    assert page.inner_text("#earlier") == f"⬆ Earlier messages ({4002 - LATEST:,} more)"

    # Scrolled to the top of what it shows, the chat offers the earlier messages, a page at a time.
    page.locator("#chat").evaluate(
        "chat => { for (const el of chat.querySelectorAll('*')) if (el.scrollHeight > el.clientHeight + 10) el.scrollTop = 0; }")
    clicks = (MAX_SHOWN - LATEST) // PAGE + 1
    for click in range(1, clicks + 1):
        page.locator("#earlier").click()
        first = 2001 - (LATEST + click * PAGE) // 2
        page.wait_for_function("(text) => document.querySelector('#chat .message.user').innerText === text",
                               arg=f"turn {first}", timeout=30_000)
    assert users.count() + replies.count() == MAX_SHOWN  # a page of the past, never the whole chat
    assert page.locator("#latest").is_visible()
    page.locator("#latest").click()
    page.wait_for_function("(n) => document.querySelectorAll('#chat .message.user').length === n", arg=LATEST // 2,
                           timeout=30_000)
    assert users.last.inner_text() == "turn 2000" and not page.locator("#latest").is_visible()


def conversation_tokens(page) -> str:
    """The panel's count of the conversation's tokens."""
    return re.search(r"Tokens in cache / in conversation\s+[\d,]+ / ([\d,]+)", page.inner_text("#metrics")).group(1)


def test_a_reload_shows_the_same_conversation_and_another_browser_does_not_list_it(served, browser):
    page = browser()
    page.goto(served.url)
    page.wait_for_selector("#metrics table", timeout=60_000)
    set_number(page, "Max new tokens", "8")
    page.locator("#message textarea").fill("remember this conversation")
    page.locator("#message textarea").press("Enter")
    page.wait_for_function(DONE, timeout=60_000)
    page.wait_for_function("(document.querySelector('#conversations') || {innerText: ''}).innerText"
                           ".includes('remember this conversation')", timeout=30_000)
    reply, tokens = page.locator("#chat .message.bot").inner_text(), conversation_tokens(page)

    page.reload()
    page.wait_for_function("(document.querySelector('#status') || {innerText: ''}).innerText"
                           ".startsWith('Restored 2 messages')", timeout=60_000)
    assert page.locator("#chat .message.user").inner_text() == "remember this conversation"
    assert page.locator("#chat .message.bot").inner_text() == reply
    assert conversation_tokens(page) == tokens
    assert page.locator("#conversations input:checked").count() == 1
    owner = next(b.owner for b in served.app.pages._bindings.values())

    other = browser()
    other.goto(served.url)
    other.wait_for_function("(document.querySelector('#status') || {}).innerText === 'Ready.'", timeout=60_000)
    assert other.locator("#chat .message").count() == 0
    assert other.locator("#conversations input").count() == 0
    assert "remember this conversation" not in other.inner_text("body")
    assert {b.owner for b in served.app.pages._bindings.values()} - {owner}  # the second browser has its own key
