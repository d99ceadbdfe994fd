"""lckv_stream.store and conversation_file: round trips, owners, crashes, imports, WAL, open time."""

from __future__ import annotations

import json
import multiprocessing
import os
import secrets
import signal
import sqlite3
import threading
import time
from pathlib import Path

import pytest
import torch

from app_support.tiny import tiny_model
from lckv_stream.conversation import (
    COMPLETE,
    CUT,
    STOPPED,
    STREAMING,
    Conversation,
    ConversationSettings,
    Message,
    status_for_reason,
)
from lckv_stream.conversation_file import MAX_BYTES, ConversationFileError, dumps, loads
from lckv_stream.chat import CacheSettings, ChatSession, TokenEvent, TurnEnd
from lckv_stream.sampling import SamplingSettings
from lckv_stream.store import (
    DB_NAME,
    ConversationNotFound,
    ConversationStore,
    StoreError,
    default_data_dir,
    open_store,
    store_enabled,
)

ALICE, BOB = "alice-browser-key", "bob-browser-key"
VOCAB = 300


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def path(tmp_path) -> Path:
    return tmp_path / "store" / DB_NAME


@pytest.fixture
def store(path):
    with ConversationStore(path, clock=Clock()) as opened:
        yield opened


def turn(store, cid, owner, question, ids, answer, reply_ids, status=COMPLETE):
    store.append_message(cid, owner, "user", question, ids, segment_text=f"<user>{question}")
    writer = store.begin_reply(cid, owner, flush_tokens=2, flush_seconds=3600)
    for token, piece in zip(reply_ids, answer.split(" ")):
        writer.add(token, piece + " ")
    writer.finish(status, answer)


def conversation_count(path) -> int:
    with sqlite3.connect(path) as db:
        return db.execute("SELECT COUNT(*) FROM conversations").fetchone()[0]


# ---- round trips ------------------------------------------------------------------------------
def test_a_conversation_round_trips_through_a_reopened_file(path):
    settings = ConversationSettings(CacheSettings(2, 64, False), SamplingSettings(temperature=0.3, top_k=7))
    with ConversationStore(path, clock=Clock()) as store:
        cid = store.create(ALICE, settings, system_prompt="Be brief.")
        turn(store, cid, ALICE, "What is a sink?", [5, 6, 7], "The first tokens.", [8, 9, 10])
        turn(store, cid, ALICE, "And the window?", [11, 12], "The latest ones.", [13, 14], STOPPED)
    with ConversationStore(path) as store:
        conversation = store.load(cid, ALICE)
        assert store.recovered == 0
    assert conversation.id == cid and conversation.system_prompt == "Be brief."
    assert conversation.settings == settings
    assert conversation.title == "What is a sink?"  # named by the first user message
    assert [(m.role, m.content, m.tokens, m.status) for m in conversation.messages] == [
        ("user", "What is a sink?", (5, 6, 7), COMPLETE),
        ("assistant", "The first tokens.", (8, 9, 10), COMPLETE),
        ("user", "And the window?", (11, 12), COMPLETE),
        ("assistant", "The latest ones.", (13, 14), STOPPED),
    ]
    assert conversation.messages[0].segment_text == "<user>What is a sink?"
    assert conversation.messages[1].segment_text is None
    assert conversation.transcript == [5, 6, 7, 8, 9, 10, 11, 12, 13, 14]
    assert conversation.turns == 2
    assert conversation.created < conversation.messages[0].created <= conversation.updated


def test_token_ids_of_any_width_come_back_exactly(store):
    cid = store.create(ALICE)
    small, large = list(range(0, 65536, 97)), [0, 65535, 65536, 2**32 - 1]
    store.append_message(cid, ALICE, "user", "small ids", small)
    store.append_message(cid, ALICE, "assistant", "large ids", large)
    store.append_message(cid, ALICE, "user", "no ids", [])
    assert store.load(cid, ALICE).segments == [small, large, []]
    with pytest.raises(ValueError, match="token ids"):
        store.append_message(cid, ALICE, "user", "negative", [-1])
    with pytest.raises(ValueError, match="token ids"):
        store.append_message(cid, ALICE, "user", "not ids", [1.5])
    assert len(store.load(cid, ALICE).messages) == 3


def test_a_chat_session_recorded_through_its_public_events_gives_back_its_transcript(store, tokenizer):
    """What the wiring will do: the user message's tokens are the transcript's growth minus the reply."""
    sampling = SamplingSettings(temperature=0, max_new_tokens=5)
    chat = ChatSession(tiny_model(vocab_size=len(tokenizer)), tokenizer, system_prompt="Be brief.",
                       cache_settings=CacheSettings(4, 64), sampling=sampling, seed=0)
    cid = store.create(ALICE, ConversationSettings(chat.cache_settings, sampling), chat.system_prompt)
    for text in ("hello there", "how are you today?"):
        before = len(chat.transcript)
        events = list(chat.send(text))
        reply_ids = [e.token_id for e in events if isinstance(e, TokenEvent)]
        end = events[-1]
        assert isinstance(end, TurnEnd)
        user_ids = chat.transcript[before: len(chat.transcript) - len(reply_ids)]
        store.append_message(cid, ALICE, "user", text, user_ids)
        writer = store.begin_reply(cid, ALICE)
        for event in events:
            if isinstance(event, TokenEvent):
                writer.add(event.token_id, event.text)
        writer.finish(status_for_reason(end.reason), end.reply)
    stored = store.load(cid, ALICE)
    assert stored.transcript == chat.transcript
    assert [(m.role, m.content) for m in stored.messages] == [(m["role"], m["content"]) for m in chat.messages]
    assert stored.system_prompt == chat.system_prompt and stored.settings.cache == chat.cache_settings


def test_statuses_follow_the_turn_end_reason():
    assert [status_for_reason(r) for r in ("eos", "max_new_tokens", "stopped", "stopped_while_reading")] == [
        COMPLETE, COMPLETE, STOPPED, STOPPED,
    ]


# ---- owners -----------------------------------------------------------------------------------
def test_a_browser_sees_only_its_own_conversations(store):
    mine = store.create(ALICE)
    turn(store, mine, ALICE, "secret", [1], "kept", [2])
    theirs = store.create(BOB)
    assert [s.id for s in store.list(ALICE)] == [mine] and [s.id for s in store.list(BOB)] == [theirs]
    assert store.list("somebody-else") == []
    guessed = [secrets.token_urlsafe(16) for _ in range(20)]
    attempts = [
        lambda cid: store.load(cid, BOB),
        lambda cid: store.export_json(cid, BOB),
        lambda cid: store.rename(cid, BOB, "mine now"),
        lambda cid: store.delete(cid, BOB),
        lambda cid: store.append_message(cid, BOB, "user", "hi", [1]),
        lambda cid: store.begin_reply(cid, BOB),
        lambda cid: store.truncate(cid, BOB, 0),
        lambda cid: store.configure(cid, BOB, system_prompt="obey"),
        lambda cid: store.get_cache_rows(cid, BOB),
        lambda cid: store.update_streaming(cid, BOB, 1, "x", [1]),
    ]
    for attempt in attempts:
        for cid in [mine, *guessed[:2], "", "../../etc/passwd", mine + "x", 12345]:
            with pytest.raises(ConversationNotFound, match="no such conversation"):
                attempt(cid)
    for cid in guessed:
        with pytest.raises(ConversationNotFound):
            store.load(cid, ALICE)
    conversation = store.load(mine, ALICE)  # untouched by all of that
    assert conversation.title == "secret" and len(conversation.messages) == 2


def test_ids_are_random_and_the_file_does_not_hold_owner_keys(store, path):
    ids = {store.create(ALICE) for _ in range(200)}
    assert len(ids) == 200
    assert all(len(cid) >= 22 for cid in ids)  # 16 random bytes in URL-safe base64: 128 bits
    store.checkpoint()
    assert ALICE.encode() not in path.read_bytes()


def test_list_rename_and_delete(store, path):
    first = store.create(ALICE, title="first")
    second = store.create(ALICE)
    store.append_message(first, ALICE, "user", "  a\nnew\tmessage  ", [1])  # activity moves it up
    assert [s.id for s in store.list(ALICE)] == [first, second]
    assert [(s.title, s.messages) for s in store.list(ALICE)] == [("first", 1), ("New conversation", 0)]
    store.rename(second, ALICE, "  renamed\n")
    store.append_message(second, ALICE, "user", "does not rename it", [1])
    assert store.load(second, ALICE).title == "renamed"
    with pytest.raises(ValueError, match="empty"):
        store.rename(second, ALICE, " \n ")
    assert len(store.load(first, ALICE).title) <= 120
    store.put_cache_rows(first, ALICE, {"keys.0": torch.ones(2)}, 1, "model")
    store.delete(first, ALICE)
    assert [s.id for s in store.list(ALICE)] == [second]
    with sqlite3.connect(path) as db:  # messages and cache rows go with it
        assert db.execute("SELECT COUNT(*) FROM messages").fetchone()[0] == 1
        assert db.execute("SELECT COUNT(*) FROM cache_rows").fetchone()[0] == 0


def test_a_long_first_message_gives_a_short_title(store):
    cid = store.create(ALICE)
    store.append_message(cid, ALICE, "user", "word " * 100, [1])
    title = store.load(cid, ALICE).title
    assert len(title) == 60 and title.endswith("\u2026")


# ---- streaming, crashes -----------------------------------------------------------------------
def test_a_streaming_reply_is_written_every_n_tokens_and_finished(store):
    cid = store.create(ALICE)
    store.append_message(cid, ALICE, "user", "count", [1])
    writer = store.begin_reply(cid, ALICE, flush_tokens=4, flush_seconds=3600)
    last = lambda: store.load(cid, ALICE).messages[-1]  # noqa: E731
    assert (last().status, last().tokens) == (STREAMING, ())
    for token in range(3):
        writer.add(token, f"{token} ")
    assert last().tokens == ()  # not yet: the writes are batched
    writer.add(3, "3 ")
    assert (last().tokens, last().content, last().status) == ((0, 1, 2, 3), "0 1 2 3 ", STREAMING)
    writer.add(4, "4")
    writer.finish(COMPLETE, "0 1 2 3 4", segment_text="0 1 2 3 4<end>")
    assert (last().tokens, last().content, last().status) == ((0, 1, 2, 3, 4), "0 1 2 3 4", COMPLETE)
    assert last().segment_text == "0 1 2 3 4<end>"
    with pytest.raises(StoreError, match="not a streaming reply"):
        store.update_streaming(cid, ALICE, writer.position, "late", [9])
    with pytest.raises(StoreError, match="not a streaming reply"):
        store.finish_message(cid, ALICE, 0, "the user message", [1])
    with pytest.raises(ValueError, match="finished message"):
        store.append_message(cid, ALICE, "assistant", "x", [1], status=STREAMING)


def test_a_time_limit_flushes_a_slow_reply(store):
    cid = store.create(ALICE)
    writer = store.begin_reply(cid, ALICE, flush_tokens=1000, flush_seconds=0.05)
    writer.add(1, "a")
    time.sleep(0.06)
    writer.add(2, "b")
    assert store.load(cid, ALICE).messages[-1].tokens == (1, 2)


def test_a_reply_left_streaming_is_reported_cut_on_reopen(path):
    with ConversationStore(path) as store:
        cid = store.create(ALICE)
        turn(store, cid, ALICE, "q", [1], "a", [2])
        store.append_message(cid, ALICE, "user", "long story please", [3, 4])
        writer = store.begin_reply(cid, ALICE, flush_tokens=2)
        for token in (5, 6, 7):
            writer.add(token, f"w{token} ")
        # The process ends here, without finish().
    with ConversationStore(path) as store:
        assert store.recovered == 1
        messages = store.load(cid, ALICE).messages
        assert [m.status for m in messages] == [COMPLETE, COMPLETE, COMPLETE, CUT]
        assert (messages[-1].tokens, messages[-1].content) == ((5, 6), "w5 w6 ")
    with ConversationStore(path) as store:
        assert store.recovered == 0  # once cut, it stays so


def _write_until_killed(path: str, report) -> None:
    """In a forked child: three whole turns, then a reply streamed forever, reporting each flush."""
    store = ConversationStore(path)
    cid = store.create(ALICE)
    for i in range(3):
        turn(store, cid, ALICE, f"question {i}", [10 + i], f"answer {i}", [20 + i])
    store.append_message(cid, ALICE, "user", "tell me a long story", [30, 31])
    writer = store.begin_reply(cid, ALICE, flush_tokens=5, flush_seconds=3600)
    count = 0
    while True:
        writer.add(count % VOCAB, f"w{count} ")
        count += 1
        if count % 5 == 0:  # that add flushed: `count` tokens are committed
            report.send((cid, count))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_sigkill_mid_reply_keeps_every_message_and_the_partial_reply(path):
    path.parent.mkdir(parents=True)
    receive, send = multiprocessing.Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(target=_write_until_killed, args=(str(path), send))
    child.start()
    try:
        committed = 0
        while committed < 100:
            assert receive.poll(30), "the writer stopped reporting"
            cid, committed = receive.recv()
        os.kill(child.pid, signal.SIGKILL)  # while it is still streaming
    finally:
        child.join(10)
    assert child.exitcode == -signal.SIGKILL
    with ConversationStore(path) as store:
        assert store.recovered == 1
        messages = store.load(cid, ALICE).messages
    assert [(m.role, m.content, m.status) for m in messages[:6]] == [
        (role, f"{kind} {i}", COMPLETE) for i in range(3) for role, kind in (("user", "question"), ("assistant", "answer"))
    ]
    assert messages[6].content == "tell me a long story" and messages[6].tokens == (30, 31)
    partial = messages[7]
    assert partial.status == CUT and partial.role == "assistant"
    assert len(partial.tokens) >= committed and len(partial.tokens) % 5 == 0  # a whole flush, nothing torn
    assert partial.tokens == tuple(i % VOCAB for i in range(len(partial.tokens)))
    assert partial.content == "".join(f"w{i} " for i in range(len(partial.tokens)))


# ---- edits: undo, regenerate, settings ----------------------------------------------------------
def test_truncate_then_append_continues_in_order(store):
    cid = store.create(ALICE)
    turn(store, cid, ALICE, "one", [1], "uno", [2])
    turn(store, cid, ALICE, "two", [3], "dos", [4])
    store.truncate(cid, ALICE, 3)  # regenerate: drop the last reply
    turn_reply = store.begin_reply(cid, ALICE)
    turn_reply.add(5, "deux")
    turn_reply.finish()
    assert store.load(cid, ALICE).transcript == [1, 2, 3, 5]
    store.truncate(cid, ALICE, 2)  # undo
    assert [m.content for m in store.load(cid, ALICE).messages] == ["one", "uno"]
    store.truncate(cid, ALICE, 0)  # clear
    assert store.load(cid, ALICE).messages == ()
    with pytest.raises(ValueError):
        store.truncate(cid, ALICE, -1)


def test_configure_stores_settings_and_the_retemplated_first_message(store):
    cid = store.create(ALICE, system_prompt="old")
    turn(store, cid, ALICE, "hi", [1, 2], "hello", [3])
    new = ConversationSettings(CacheSettings(8, 128), SamplingSettings(max_new_tokens=9))
    store.configure(cid, ALICE, settings=new, system_prompt="new", first_segment=([7, 8, 9, 2], "<new>hi"))
    conversation = store.load(cid, ALICE)
    assert conversation.settings == new and conversation.system_prompt == "new"
    assert conversation.messages[0].tokens == (7, 8, 9, 2) and conversation.messages[0].segment_text == "<new>hi"
    assert conversation.messages[0].content == "hi"
    store.configure(cid, ALICE, system_prompt=None)
    assert store.load(cid, ALICE).system_prompt is None
    empty = store.create(ALICE)
    with pytest.raises(StoreError, match="no messages"):
        store.configure(empty, ALICE, system_prompt="x", first_segment=([1], None))
    assert store.load(empty, ALICE).system_prompt is None  # the failed call wrote nothing


# ---- cache rows -------------------------------------------------------------------------------
def test_cache_rows_round_trip_as_safetensors_and_follow_the_transcript(store, path):
    cid = store.create(ALICE)
    turn(store, cid, ALICE, "q", [1, 2], "a", [3])
    state = {"keys.0": torch.randn(1, 2, 6, 4), "positions": torch.arange(6), "half": torch.randn(3).to(torch.bfloat16)}
    store.put_cache_rows(cid, ALICE, state, 3, "tiny/4+64")
    rows = store.get_cache_rows(cid, ALICE)
    assert (rows.messages, rows.transcript_length, rows.fingerprint) == (2, 3, "tiny/4+64")
    assert rows.tensors.keys() == state.keys()
    assert all(torch.equal(rows.tensors[k], state[k]) and rows.tensors[k].dtype == state[k].dtype for k in state)
    with sqlite3.connect(path) as db:  # safetensors: an 8-byte header length, then a JSON header
        blob = db.execute("SELECT data FROM cache_rows").fetchone()[0]
    header = int.from_bytes(blob[:8], "little")
    assert json.loads(blob[8: 8 + header])["positions"]["dtype"] == "I64"
    with pytest.raises(ValueError, match="no message ends at token 1"):
        store.put_cache_rows(cid, ALICE, state, 1, "tiny/4+64")
    with pytest.raises(ValueError, match="no message ends at token 4"):
        store.put_cache_rows(cid, ALICE, state, 4, "tiny/4+64")
    turn(store, cid, ALICE, "q2", [4], "a2", [5])
    assert store.get_cache_rows(cid, ALICE).transcript_length == 3  # still a valid prefix
    store.configure(cid, ALICE, settings=ConversationSettings(sampling=SamplingSettings(top_k=3)))
    assert store.get_cache_rows(cid, ALICE) is not None  # sampling does not change the cache
    store.truncate(cid, ALICE, 2)
    assert store.get_cache_rows(cid, ALICE) is not None  # the prefix it holds is intact
    store.truncate(cid, ALICE, 1)
    assert store.get_cache_rows(cid, ALICE) is None
    store.append_message(cid, ALICE, "assistant", "a", [3])
    store.put_cache_rows(cid, ALICE, state, 3, "tiny/4+64")
    store.configure(cid, ALICE, settings=ConversationSettings(CacheSettings(4, 32)))
    assert store.get_cache_rows(cid, ALICE) is None  # another cache shape


# ---- files ------------------------------------------------------------------------------------
def test_export_then_import_gives_the_same_conversation_under_a_new_id(store):
    cid = store.create(ALICE, ConversationSettings(CacheSettings(2, 16)), "sys")
    turn(store, cid, ALICE, "q", [1, 2], "a b", [3, 4], STOPPED)
    writer = store.begin_reply(cid, ALICE)
    writer.add(5, "partial")
    writer.flush()
    text = store.export_json(cid, ALICE)
    document = json.loads(text)
    assert (document["format"], document["version"]) == ("lckv-stream-conversation", 1)
    assert "id" not in document and ALICE not in text
    assert document["messages"][-1]["status"] == CUT  # a reply still streaming is exported as cut
    copy = store.import_json(text, BOB, VOCAB)
    assert copy != cid and [s.id for s in store.list(BOB)] == [copy]
    original, imported = store.load(cid, ALICE), store.load(copy, BOB)
    assert imported.messages[:-1] == original.messages[:-1]
    assert imported.messages[-1].status == CUT and imported.messages[-1].tokens == (5,)
    assert (imported.title, imported.system_prompt, imported.settings, imported.created) == (
        original.title, original.system_prompt, original.settings, original.created,
    )


def test_import_of_a_file_on_disk(store, tmp_path):
    cid = store.create(ALICE)
    turn(store, cid, ALICE, "q", [1], "a", [2])
    file = tmp_path / "chat.json"
    file.write_text(store.export_json(cid, ALICE), encoding="utf-8")
    assert store.load(store.import_file(file, BOB, VOCAB), BOB).transcript == [1, 2]
    with pytest.raises(ConversationFileError, match="cannot read the file"):
        store.import_file(tmp_path / "missing.json", BOB, VOCAB)


def _valid() -> dict:
    return {
        "format": "lckv-stream-conversation", "version": 1, "title": "t", "system_prompt": None,
        "settings": {"cache": {"sink": 4, "window": 64}, "sampling": {"temperature": 0.5}},
        "messages": [
            {"role": "user", "content": "q", "tokens": [1, 2]},
            {"role": "assistant", "content": "a", "tokens": [3], "status": "stopped"},
        ],
    }


def _with(change):
    document = _valid()
    change(document)
    return json.dumps(document)


REJECTED = {
    "malformed JSON": ('{"format": "lckv-stream-conversation", "version": 1, "messages": [', "not valid JSON"),
    "NaN": (_with(lambda d: d.update(created=float("nan"))), "NaN is not a number"),
    "not UTF-8": (b'{"format": "\xff"}', "not UTF-8"),
    "nested too deeply": ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "a list": ("[1, 2, 3]", "not a conversation"),
    "another format": (_with(lambda d: d.update(format="chatgpt")), "not a conversation"),
    "a newer version": (_with(lambda d: d.update(version=2)), "version 2; this app reads version 1"),
    "version as text": (_with(lambda d: d.update(version="1")), "version"),
    "unknown field": (_with(lambda d: d.update(model="gpt")), "unknown fields: model"),
    "duplicate field": (_with(lambda d: None).replace('"title": "t"', '"title": "t", "title": "u"'), "'title' appears twice"),
    "messages not a list": (_with(lambda d: d.update(messages={"0": {}})), '"messages" must be a list'),
    "message not an object": (_with(lambda d: d["messages"].append("hi")), "message 3 of 3 must be an object"),
    "message without tokens": (_with(lambda d: d["messages"][0].pop("tokens")), "message 1 of 2 has no tokens"),
    "unknown message field": (_with(lambda d: d["messages"][0].update(name="x")), "unknown fields: name"),
    "role tool": (_with(lambda d: d["messages"][1].update(role="tool")), "role must be user, assistant or system, got 'tool'"),
    "content not text": (_with(lambda d: d["messages"][0].update(content=["q"])), "content must be text"),
    "status streaming": (_with(lambda d: d["messages"][1].update(status="streaming")), "status must be complete, stopped or cut"),
    "token past the vocabulary": (_with(lambda d: d["messages"][1].update(tokens=[3, VOCAB])), f"token 2 is {VOCAB}, not a token id of this model (0 to {VOCAB - 1})"),
    "negative token": (_with(lambda d: d["messages"][0].update(tokens=[-1])), "token 1 is -1"),
    "token as float": (_with(lambda d: d["messages"][0].update(tokens=[1.0])), "token 1 is 1.0"),
    "token as bool": (_with(lambda d: d["messages"][0].update(tokens=[True])), "token 1 is True"),
    "tokens not a list": (_with(lambda d: d["messages"][0].update(tokens="1 2")), "tokens must be a list"),
    "window 0": (_with(lambda d: d["settings"]["cache"].update(window=0)), "settings.cache: window must be a whole number >= 1"),
    "window too large": (_with(lambda d: d["settings"]["cache"].update(window=2**30)), "window must be at most"),
    "pin not a flag": (_with(lambda d: d["settings"]["cache"].update(pin_system_prompt="yes")), "pin_system_prompt must be true or false"),
    "temperature 5": (_with(lambda d: d["settings"]["sampling"].update(temperature=5)), "settings.sampling: temperature must be between 0 and 2"),
    "unknown setting": (_with(lambda d: d["settings"]["sampling"].update(min_p=0.1)), "settings.sampling has unknown fields: min_p"),
    "system prompt not text": (_with(lambda d: d.update(system_prompt=3)), '"system_prompt" must be text or null'),
    "blank title": (_with(lambda d: d.update(title="  ")), "title"),
    "negative time": (_with(lambda d: d["messages"][0].update(created=-5)), "created must be a time in seconds"),
}


@pytest.mark.parametrize("text, message", REJECTED.values(), ids=REJECTED.keys())
def test_import_rejects_with_a_clear_message_and_writes_nothing(store, path, text, message):
    before = conversation_count(path)
    with pytest.raises(ConversationFileError) as error:
        store.import_json(text, BOB, VOCAB)
    assert message in str(error.value)
    assert store.list(BOB) == [] and conversation_count(path) == before


def test_the_valid_file_of_those_imports(store):
    conversation = store.load(store.import_json(_with(lambda d: None), BOB, VOCAB), BOB)
    assert conversation.transcript == [1, 2, 3] and conversation.settings.sampling.temperature == 0.5
    assert conversation.settings.sampling.top_k == SamplingSettings().top_k  # missing: the default
    assert [m.status for m in conversation.messages] == [COMPLETE, STOPPED]


def test_a_100_mb_file_is_refused_before_it_is_read(store, path, tmp_path, monkeypatch):
    huge = tmp_path / "huge.json"
    with open(huge, "wb") as file:
        file.truncate(100 * 2**20)  # sparse: 100 MB without writing them
    read = []
    original_loads = json.loads
    monkeypatch.setattr(json, "loads", lambda *a, **k: read.append(1) or original_loads(*a, **k))
    with pytest.raises(ConversationFileError, match="too large: 100.0 MB, the limit is 20 MB"):
        store.import_file(huge, BOB, VOCAB)
    with pytest.raises(ConversationFileError, match="too large"):
        store.import_json(" " * (MAX_BYTES + 1), BOB, VOCAB)
    with pytest.raises(ConversationFileError, match="too large"):  # under the limit in characters, over in bytes
        store.import_json("\u00e9" * (MAX_BYTES // 2 + 1), BOB, VOCAB)
    assert read == [] and store.list(BOB) == [] and conversation_count(path) == 0


def test_a_database_failure_during_import_writes_nothing(store, path):
    # A message row the store cannot write (a token id past 32 bits) after the conversation row.
    bad = Conversation("", "t", 0.0, 0.0, None, ConversationSettings(),
                       (Message("user", "q", (1,)), Message("assistant", "a", (2**40,))))
    with pytest.raises(ValueError):
        store.insert(bad, BOB)
    assert conversation_count(path) == 0


def test_dumps_then_loads_is_the_identity_on_messages():
    conversation = Conversation("id", "t", 1.0, 2.0, "sys", ConversationSettings(),
                                (Message("system", "rules", (1,)), Message("user", "q", (2, 3), segment_text="<q>")))
    back = loads(dumps(conversation), VOCAB)
    assert back.messages == conversation.messages and back.system_prompt == "sys" and back.id == ""
    with pytest.raises(ValueError, match="vocab_size"):
        loads(dumps(conversation), 0)


# ---- the file itself ----------------------------------------------------------------------------
def test_the_store_is_in_wal_mode(store, path):
    assert store.journal_mode == "wal"
    store.create(ALICE)
    assert path.with_name(path.name + "-wal").exists()
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_file_from_a_newer_version_is_refused(path):
    ConversationStore(path).close()
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreError, match="newer lckv-stream"):
        ConversationStore(path)


def test_threads_writing_at_once_lose_nothing(store):
    shared = store.create(ALICE)
    own = [store.create(ALICE) for _ in range(6)]
    errors = []

    def work(index: int) -> None:
        try:
            for i in range(30):
                store.append_message(own[index], ALICE, "user", f"{index}/{i}", [i])
                store.append_message(shared, ALICE, "user", f"{index}/{i}", [index])
                store.load(shared, ALICE)
        except Exception as error:  # pragma: no cover - reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    for index, cid in enumerate(own):
        assert [m.content for m in store.load(cid, ALICE).messages] == [f"{index}/{i}" for i in range(30)]
    contents = [m.content for m in store.load(shared, ALICE).messages]
    assert sorted(contents) == sorted(f"{t}/{i}" for t in range(6) for i in range(30))


def test_opening_a_5000_turn_conversation_is_fast(store, path):
    """The measurement is bench/bench_store.py; this guards against something quadratic."""
    messages = []
    for i in range(5000):
        messages.append(Message("user", f"question {i} " * 4, tuple(range(i % 50, i % 50 + 20)), segment_text="<t>"))
        messages.append(Message("assistant", f"answer {i} " * 10, tuple(range(30))))
    cid = store.insert(Conversation("", "long", 1.0, 1.0, None, ConversationSettings(), tuple(messages)), ALICE)
    store.close()
    begin = time.perf_counter()
    with ConversationStore(path) as reopened:
        conversation = reopened.load(cid, ALICE)
    elapsed = time.perf_counter() - begin
    assert conversation.turns == 5000 and len(conversation.transcript) == 5000 * 50
    assert elapsed < 2.0, f"opening 5,000 turns took {elapsed:.2f} s"


# ---- where it lives ---------------------------------------------------------------------------
def test_the_data_directory_follows_the_environment(tmp_path):
    spaces = tmp_path / "data"
    assert default_data_dir({"LCKV_DATA_DIR": str(tmp_path / "mine")}, spaces) == tmp_path / "mine"
    assert default_data_dir({"XDG_DATA_HOME": str(tmp_path / "xdg")}, spaces) == tmp_path / "xdg" / "lckv-stream"
    assert default_data_dir({}, spaces) == Path.home() / ".local" / "share" / "lckv-stream"
    spaces.mkdir()  # a Space with persistent storage mounts /data
    assert default_data_dir({"XDG_DATA_HOME": str(tmp_path / "xdg")}, spaces) == spaces / "lckv-stream"
    assert default_data_dir({"LCKV_DATA_DIR": str(tmp_path / "mine")}, spaces) == tmp_path / "mine"
    if os.geteuid() != 0:  # root writes anywhere
        spaces.chmod(0o500)
        assert default_data_dir({}, spaces) == Path.home() / ".local" / "share" / "lckv-stream"
        spaces.chmod(0o700)


def test_lckv_store_off_means_no_store(tmp_path):
    assert open_store({"LCKV_STORE": "off", "LCKV_DATA_DIR": str(tmp_path)}) is None
    assert not list(tmp_path.iterdir())
    assert store_enabled({}) and store_enabled({"LCKV_STORE": "on"}) and not store_enabled({"LCKV_STORE": "OFF"})
    with pytest.raises(ValueError, match="LCKV_STORE must be on or off"):
        store_enabled({"LCKV_STORE": "sometimes"})
    with open_store({"LCKV_DATA_DIR": str(tmp_path / "d")}) as store:
        assert store.path == tmp_path / "d" / DB_NAME and store.list(ALICE) == []
