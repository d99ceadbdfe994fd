"""Saved conversations in the app: app_support/history.py and the handlers that use it, called
directly (no server) on the tiny random model with a store in a temporary folder.

A page is a Gradio session hash; a browser is the owner key its state holds. Over the API and in a
real browser the same events are tested in test_app.py and test_browser.py.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from types import SimpleNamespace

import pytest

from app_support.app_config import AppConfig
from app_support.handlers import NOT_LISTED, NOT_OPENED, NOT_SAVED, TAKEN, ChatApp
from app_support.history import Pages, browser_secret, new_owner, read_browser_value
from app_support.tiny import tiny_random_model
from lckv_stream.conversation_file import MAX_BYTES
from lckv_stream.store import ConversationStore

WINDOW = 64
# What the handlers return: the view (chat, draft, status, panel, plot, numbers, three buttons), then
# for open and the side list's events (browser state, side list, system prompt, sink, window, export file), for
# Send (message box, ticket, browser state, side list).
CHAT, STATUS, NUMBERS = 0, 2, 5
BROWSER, LISTED, PROMPT, SINK, SHOWN_WINDOW = 9, 10, 11, 12, 13
TICKET, SENT_BROWSER, SENT_LISTED = 10, 11, 12
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:gradio.helpers")  # the notices' toasts, outside a page


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_random_model()


@pytest.fixture
def store(tmp_path):
    with ConversationStore(tmp_path / "conversations.sqlite3") as store:
        yield store


@pytest.fixture
def chat_app(model_and_tokenizer, store):
    model, tokenizer = model_and_tokenizer
    return ChatApp(model, tokenizer, AppConfig(model="tiny-random", window=WINDOW), store)


def page(name: str | None = None) -> SimpleNamespace:
    """A page: what the handlers read of gr.Request."""
    return SimpleNamespace(session_hash=name or secrets.token_hex(8))


def value(update: dict):
    assert update["__type__"] == "update"
    return update["value"]


def listed(update: dict) -> list[tuple[str, str]]:
    return [tuple(choice) for choice in update["choices"]]


def turn(chat_app: ChatApp, request, message: str, system_prompt: str = "", window: int = WINDOW) -> tuple:
    """Send, then the reply (8 tokens); returns (what Send returned, the reply's last view)."""
    sent = chat_app.send(message, system_prompt, 4, window, None, request)
    assert not sent[STATUS].startswith("⚠️"), sent[STATUS]
    return sent, list(chat_app.respond(sent[TICKET], 8, 0.7, 0.9, request))[-1]


def test_browser_values_owner_keys_and_the_secret(tmp_path):
    owner = new_owner()
    assert len(owner) == 43 and owner != new_owner()  # 256 random bits, URL-safe
    assert read_browser_value({"owner": owner, "current": "abc"}) == (owner, "abc")
    for kept in (None, "x", 5, [owner], {"owner": "short"}, {"owner": 7}, {"owner": owner + "!"}):
        assert read_browser_value(kept)[0] is None
    assert read_browser_value({"owner": owner, "current": 5}) == (owner, None)
    assert read_browser_value({"__type__": "update", "value": {"owner": owner}}) == (owner, None)  # as /open gave it
    first = browser_secret(tmp_path)
    assert browser_secret(tmp_path) == first and len(first) >= 32  # read back after a restart
    assert stat.S_IMODE(os.stat(tmp_path / "browser-state.key").st_mode) == 0o600


def test_the_store_settings_come_from_the_environment(tmp_path):
    config = AppConfig.from_env({"LCKV_STORE": "off", "LCKV_DATA_DIR": str(tmp_path)})
    assert (config.store, config.data_dir) == ("off", str(tmp_path))
    assert config.store_environ({"HOME": "/h"}) == {"HOME": "/h", "LCKV_STORE": "off", "LCKV_DATA_DIR": str(tmp_path)}
    assert "LCKV_DATA_DIR" not in AppConfig().store_environ({})  # the store's default folder
    with pytest.raises(ValueError, match="LCKV_STORE must be on or off, got 'maybe'"):
        AppConfig.from_env({"LCKV_STORE": "maybe"})


def test_a_conversation_is_held_by_one_page_at_a_time():
    pages = Pages()
    one, two = pages.bind("one", "owner"), pages.bind("two", "owner")
    assert pages.hold("one", "c1") is None and pages.holder("c1") == "one"
    assert pages.hold("two", "c1") == "one"
    assert (one.conversation_id, one.taken) == (None, True) and two.conversation_id == "c1"
    pages.forget("one")  # the first page's late unload does not take it from the second
    assert pages.holder("c1") == "two"
    pages.let_go("two")
    assert pages.holder("c1") is None and two.conversation_id is None
    # Past its capacity the least recently used page is forgotten, with the conversation it held.
    few = Pages(capacity=2)
    few.bind("a", "owner"), few.bind("b", "owner")
    few.hold("a", "ca")
    few.get("a")
    few.bind("c", "owner")
    assert few.get("b") is None and few.holder("ca") == "a" and few.get("c") is not None
    few.bind("d", "owner")
    assert few.get("a") is None and few.holder("ca") is None


def test_a_reload_restores_the_conversation_and_its_panel(chat_app, store):
    first = page()
    opened = chat_app.open(None, first)
    assert opened[STATUS] == "Ready." and value(opened[BROWSER])["current"] is None
    sent, _ = turn(chat_app, first, "hello there", system_prompt="Be brief.", window=96)
    kept = value(sent[SENT_BROWSER])  # what the browser keeps once the first message saved the conversation
    assert listed(sent[SENT_LISTED]) == [("hello there", kept["current"])]
    before = turn(chat_app, first, "and again", system_prompt="Be brief.", window=96)[1]
    chat_app.close(first)

    again = page()
    restored = chat_app.open(kept, again)
    assert restored[STATUS] == ("Restored 4 messages (2 turns) from the store. Its cache is read again from the "
                                "transcript at your next message.")
    assert restored[CHAT] == before[CHAT]
    for name in ("messages", "turns", "conversation_tokens", "sink", "sink_setting", "pinned_tokens", "window"):
        assert restored[NUMBERS][name] == before[NUMBERS][name], name
    # The settings controls show the conversation's own: they go with the next message.
    assert (value(restored[PROMPT]), value(restored[SINK]), value(restored[SHOWN_WINDOW])) == ("Be brief.", 4, 96)
    assert value(restored[BROWSER]) == kept and value(restored[LISTED]) == kept["current"]
    after = turn(chat_app, again, "one more", system_prompt="Be brief.", window=96)[1]
    assert after[STATUS].startswith("Done:") and after[NUMBERS]["messages"] == 6
    stored = store.load(kept["current"], kept["owner"])
    assert [m.content for m in stored.messages[::2]] == ["hello there", "and again", "one more"]
    assert stored.transcript == chat_app.registry.peek(again.session_hash).transcript


def test_another_browser_cannot_list_open_rename_delete_or_export_a_conversation(chat_app, store):
    alice = page()
    chat_app.open(None, alice)
    sent, _ = turn(chat_app, alice, "my secret plan")
    mine = value(sent[SENT_BROWSER])

    bob = page()
    opened = chat_app.open(None, bob)
    bobs = value(opened[BROWSER])
    assert bobs["owner"] != mine["owner"] and listed(opened[LISTED]) == []
    # Alice's id, passed as the side list's choice, or guessed: no such conversation, nothing changes.
    for foreign in [mine["current"]] + [secrets.token_urlsafe(16) for _ in range(20)]:
        refused = chat_app.switch(foreign, bob)
        assert refused[STATUS] == f"⚠️ {NOT_LISTED}" and refused[CHAT] == []
    # Alice's id as the conversation Bob's browser had open: read as gone, whether it exists or not.
    reopened = chat_app.open({"owner": bobs["owner"], "current": mine["current"]}, bob)
    assert reopened[STATUS].startswith("The conversation this browser had open is not on this server any more")
    assert reopened[CHAT] == [] and value(reopened[BROWSER])["current"] is None
    # Rename, delete and export act on Bob's own open conversation only, which is not saved yet.
    assert chat_app.rename("stolen", bob)[2] == "⚠️ this conversation is saved with its first message: send one, then name it"
    assert chat_app.delete(True, bob)[STATUS] == "⚠️ this conversation is not saved yet: there is nothing to delete"
    assert chat_app.export(bob)[1] == "⚠️ there is nothing to export yet: send a message first"
    turn(chat_app, bob, "bob's own")
    chat_app.rename("Bob's", bob)
    exported = json.loads(open(value(chat_app.export(bob)[0])).read())
    assert [m["content"] for m in exported["messages"]][0] == "bob's own"
    chat_app.delete(True, bob)
    # A page that never opened (an API client) has no owner: it is refused, not given one.
    stranger = page()
    assert chat_app.switch(mine["current"], stranger)[STATUS] == f"⚠️ {NOT_OPENED}"

    alices = store.load(mine["current"], mine["owner"])
    assert alices.title == "my secret plan" and [m.content for m in alices.messages][0] == "my secret plan"
    assert [s.id for s in store.list(mine["owner"])] == [mine["current"]]
    assert store.list(bobs["owner"]) == []


def test_switch_new_rename_delete_and_export(chat_app, store):
    me = page()
    chat_app.open(None, me)
    first = value(turn(chat_app, me, "first topic", system_prompt="Talk like a pirate.")[0][SENT_BROWSER])
    fresh = chat_app.new_conversation(me)
    assert fresh[CHAT] == [] and value(fresh[BROWSER])["current"] is None and value(fresh[PROMPT]) == ""
    second = value(turn(chat_app, me, "second topic")[0][SENT_BROWSER])
    switched = chat_app.switch(first["current"], me)
    assert [m["content"] for m in switched[CHAT][::2]] == ["first topic"]
    assert value(switched[PROMPT]) == "Talk like a pirate." and value(switched[BROWSER]) == first
    assert {title for title, _ in listed(switched[LISTED])} == {"first topic", "second topic"}
    assert chat_app.switch(first["current"], me)[STATUS] == "This conversation is already open."

    renamed = chat_app.rename("  Pirate\nstuff ", me)
    assert renamed[2] == "Renamed." and renamed[1] == ""
    assert ("Pirate stuff", first["current"]) in listed(renamed[0])
    assert chat_app.rename("   ", me)[2] == "⚠️ the title is empty"

    file, note = chat_app.export(me)
    path = value(file)
    assert path.endswith("pirate-stuff.json") and note.startswith("Exported 2 messages as pirate-stuff.json")
    assert json.loads(open(path).read())["title"] == "Pirate stuff"

    assert chat_app.delete(False, me)[STATUS] == "Not deleted."  # the page's confirm() said no
    deleted = chat_app.delete(True, me)
    assert deleted[STATUS] == "Deleted. A new conversation starts here." and deleted[CHAT] == []
    assert listed(deleted[LISTED]) == [("second topic", second["current"])]
    assert [s.id for s in store.list(first["owner"])] == [second["current"]]
    chat_app.close(me)
    assert not os.path.exists(path)  # the page's export files go with it


def test_an_import_opens_the_file_as_a_new_conversation(chat_app, store, tmp_path):
    me = page()
    chat_app.open(None, me)
    turn(chat_app, me, "worth keeping")
    path = value(chat_app.export(me)[0])
    other = page()
    owner = value(chat_app.open(None, other)[BROWSER])["owner"]
    imported = chat_app.import_file({"path": path}, other)
    assert imported[STATUS].startswith("Imported “worth keeping”: 2 messages (1 turn). Its cache is read again")
    assert [m["content"] for m in imported[CHAT]][0] == "worth keeping"
    assert listed(imported[LISTED]) == [("worth keeping", value(imported[BROWSER])["current"])]
    assert turn(chat_app, other, "and more")[1][STATUS].startswith("Done:")
    assert len(store.load(value(imported[BROWSER])["current"], owner).messages) == 4


def conversation_file(**changes) -> dict:
    document = {"format": "lckv-stream-conversation", "version": 1, "title": "t",
                "messages": [{"role": "user", "content": "hi", "tokens": [5, 6]}]}
    return document | changes


@pytest.mark.parametrize("content, expected", [
    (None, "the file is too large: 100.0 MB, the limit is 20 MB"),
    (b'{"format": "lckv-stream-conversation", "version": 1, "messages": [', "the file is not valid JSON"),
    (json.dumps({"messages": []}), 'the file is not a conversation: it has no "format": "lckv-stream-conversation"'),
    (json.dumps(conversation_file(messages=5)), '"messages" must be a list, got a number'),
    (json.dumps(conversation_file(messages=[{"role": "user", "content": "hi", "tokens": [5, 10**6]}])),
     "message 1 of 1: token 2 is 1000000, not a token id of this model"),
    (json.dumps(conversation_file(messages=[{"role": "robot", "content": "hi", "tokens": [5]}])),
     "message 1 of 1: role must be user, assistant or system, got 'robot'"),
    (json.dumps(conversation_file(settings={"cache": {"sink": 4, "window": 100_000}})),
     "the file's conversation cannot be opened here: window must be between 16 and 8192, got 100000"),
])
def test_an_import_that_is_not_acceptable_says_why_and_writes_nothing(chat_app, store, tmp_path, content, expected):
    me = page()
    owner = value(chat_app.open(None, me)[BROWSER])["owner"]
    turn(chat_app, me, "already here")
    before = store.list(owner)
    path = tmp_path / "upload.json"
    if content is None:
        with open(path, "wb") as file:  # sparse: 100 MB long, nothing written to the disk
            file.truncate(100 * 2**20)
        assert os.path.getsize(path) > MAX_BYTES
    else:
        path.write_bytes(content.encode() if isinstance(content, str) else content)
    refused = chat_app.import_file({"path": str(path)}, me)
    assert refused[STATUS].startswith(f"⚠️ Not imported: {expected}"), refused[STATUS]
    assert store.list(owner) == before
    assert [m["content"] for m in refused[CHAT]][0] == "already here"  # the open conversation stays


def test_a_page_whose_conversation_another_page_opened_starts_a_new_one(chat_app, store):
    one, two = page(), page()
    kept = value(chat_app.open(None, one)[BROWSER])
    kept = value(turn(chat_app, one, "shared")[0][SENT_BROWSER])
    assert chat_app.open(kept, two)[STATUS].startswith("Restored 2 messages")
    sent, _ = turn(chat_app, one, "from the old tab")
    assert sent[STATUS].startswith(TAKEN)
    assert value(sent[SENT_BROWSER])["current"] != kept["current"]
    assert [m.content for m in store.load(kept["current"], kept["owner"]).messages[::2]] == ["shared"]
    assert turn(chat_app, two, "from the new tab")[1][STATUS].startswith("Done:")


def test_an_idle_conversation_comes_back_from_the_store(chat_app):
    me = page()
    chat_app.open(None, me)
    turn(chat_app, me, "before the break")
    chat_app.registry._entries[me.session_hash].last_used -= 10**6
    assert chat_app.registry.evict_idle() == [me.session_hash]
    sent, reply = turn(chat_app, me, "after the break")
    assert "it came back from the store" in sent[STATUS]
    assert [m["content"] for m in reply[CHAT][::2]] == ["before the break", "after the break"]


def test_without_a_store_the_app_works_and_says_nothing_is_saved(model_and_tokenizer, tmp_path):
    model, tokenizer = model_and_tokenizer
    chat_app = ChatApp(model, tokenizer, AppConfig(model="tiny-random", window=WINDOW, store="off"), None)
    assert chat_app.browser_secret is None
    me = page()
    opened = chat_app.open({"owner": new_owner(), "current": "x" * 22}, me)
    assert opened[STATUS] == f"Ready. Note: {NOT_SAVED}; a reload starts a new conversation."
    assert opened[BROWSER] == opened[LISTED] == {"__type__": "update"}  # left as they are
    sent, reply = turn(chat_app, me, "not kept")
    assert reply[STATUS].startswith("Done:")
    for refused in (chat_app.switch("x" * 22, me), chat_app.new_conversation(me), chat_app.delete(True, me)):
        assert refused[STATUS] == f"⚠️ {NOT_SAVED}"
    assert chat_app.rename("a title", me)[2] == f"⚠️ {NOT_SAVED}"
    # Export and import still work: the file is the conversation.
    path = value(chat_app.export(me)[0])
    other = page()
    chat_app.open(None, other)
    imported = chat_app.import_file({"path": path}, other)
    assert imported[STATUS].endswith("Not saved on this server.")
    assert [m["content"] for m in imported[CHAT]][0] == "not kept"
