"""A ChatSession recorded into a ConversationStore, resumed, exported and imported."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from app_support.tiny import tiny_model, tiny_random_model
from lckv_stream import cla_map
from lckv_stream.chat import CacheSettings, ChatSession
from lckv_stream.conversation import CUT, STOPPED, ConversationSettings
from lckv_stream.conversation_file import ConversationFileError
from lckv_stream.recording import StoreRecorder
from lckv_stream.sampling import SamplingSettings
from lckv_stream.store import ConversationStore

GREEDY = SamplingSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=8)


def recorded(tokenizer, store, model, **kwargs):
    conversation_id = store.create("owner-a", ConversationSettings(CacheSettings(4, 200), GREEDY))
    chat = ChatSession(model, tokenizer, cache_settings=CacheSettings(4, 200), sampling=GREEDY, seed=0,
                       recorder=StoreRecorder(store, conversation_id, "owner-a"), **kwargs)
    return chat, conversation_id


def test_the_store_follows_the_session_through_turns_undo_regenerate_and_settings(tokenizer, tmp_path):
    model = tiny_model(cla_map(4, 2), vocab_size=len(tokenizer))
    store = ConversationStore(tmp_path / "c.sqlite3")
    chat, conversation_id = recorded(tokenizer, store, model)
    for text in ("one", "two", "three"):
        list(chat.send(text))
    chat.undo()
    list(chat.regenerate())
    chat.configure(system_prompt="Be brief.")
    stored = store.load(conversation_id, "owner-a")
    assert [(m.role, m.content) for m in stored.messages] == [(m["role"], m["content"]) for m in chat.messages]
    assert stored.transcript == chat.transcript
    assert stored.system_prompt == "Be brief."


def test_a_resumed_conversation_answers_as_the_session_that_never_stopped(tokenizer, tmp_path):
    """The transcript fits the window, so a rebuild from it is exact: the resumed session's next
    reply equals the next reply of the session it was recorded from."""
    model = tiny_model(cla_map(4, 2), vocab_size=len(tokenizer))
    store = ConversationStore(tmp_path / "c.sqlite3")
    chat, conversation_id = recorded(tokenizer, store, model)
    for text in ("first message", "second one"):
        list(chat.send(text))
    resumed = ChatSession(model, tokenizer, seed=0)
    resumed.restore(ConversationStore(tmp_path / "c.sqlite3").load(conversation_id, "owner-a"))
    assert resumed.transcript == chat.transcript and resumed.messages == chat.messages
    assert list(resumed.send("and now?"))[-1].reply == list(chat.send("and now?"))[-1].reply
    assert resumed.stats().cache.tokens_seen == len(resumed.transcript)


def test_export_and_import_round_trip_and_a_bad_file_is_refused(tokenizer, tmp_path):
    model = tiny_model(cla_map(4, 2), vocab_size=len(tokenizer))
    chat = ChatSession(model, tokenizer, cache_settings=CacheSettings(4, 200), sampling=GREEDY)
    list(chat.send("hello"))
    chat.save(tmp_path / "chat.json")
    again = ChatSession.load(tmp_path / "chat.json", model, tokenizer)
    assert again.messages == chat.messages and again.transcript == chat.transcript
    assert again.cache_settings == chat.cache_settings
    (tmp_path / "bad.json").write_text('{"format": "lckv-stream conversation", "version": 1, "messages": 5}')
    with pytest.raises(ConversationFileError):
        ChatSession.load(tmp_path / "bad.json", model, tokenizer)


CHILD = textwrap.dedent('''
    import sys
    sys.path[:0] = [sys.argv[2]]
    from app_support.tiny import tiny_random_model
    from lckv_stream.chat import CacheSettings, ChatSession
    from lckv_stream.recording import StoreRecorder
    from lckv_stream.sampling import SamplingSettings
    from lckv_stream.store import ConversationStore
    model, tokenizer = tiny_random_model()
    store = ConversationStore(sys.argv[1])
    conversation_id = store.create("owner-a")
    chat = ChatSession(model, tokenizer, cache_settings=CacheSettings(4, 400), seed=0,
                       recorder=StoreRecorder(store, conversation_id, "owner-a"))
    list(chat.send("first", SamplingSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=6)))
    print(conversation_id, flush=True)
    # Greedy, this model never ends its reply to "hello": it streams until it is killed.
    for event in chat.send("hello", SamplingSettings(temperature=0, max_new_tokens=4000)):
        if getattr(event, "index", 0) == 80:
            print("streaming", flush=True)
''')


def test_a_killed_session_keeps_every_finished_message_and_the_cut_reply(tokenizer, tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = tmp_path / "c.sqlite3"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), root], stdout=subprocess.PIPE, text=True)
    conversation_id = child.stdout.readline().strip()
    assert child.stdout.readline().strip() == "streaming"
    child.send_signal(signal.SIGKILL)
    child.wait()
    store = ConversationStore(path)
    stored = store.load(conversation_id, "owner-a")
    assert [m.role for m in stored.messages] == ["user", "assistant", "user", "assistant"]
    assert stored.messages[-1].status == CUT and len(stored.messages[-1].tokens) >= 64
    model, tokenizer = tiny_random_model()
    resumed = ChatSession(model, tokenizer, seed=0)
    resumed.restore(stored)
    rebuilt = ChatSession(model, tokenizer, seed=0)
    rebuilt.restore(stored)
    assert resumed.messages[-1]["content"] == tokenizer.decode(list(stored.messages[-1].tokens), skip_special_tokens=True)
    after = [list(session.send("go on", GREEDY))[-1].reply for session in (resumed, rebuilt)]
    assert after[0] == after[1] and resumed.transcript == rebuilt.transcript
    assert STOPPED != CUT
