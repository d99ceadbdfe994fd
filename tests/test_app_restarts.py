"""The real app (`python app.py`, tiny random model) killed or restarted on the same data folder,
driven through gradio_client as the page drives it: conversations come back whole.

- Killed with SIGKILL in the middle of a streamed reply, then started again (about 20 s): every
  finished message is there, the partial reply is kept and marked cut, and the next turn answers as
  a session rebuilt from the stored transcript does (greedy decoding: the same tokens).
- 200 turns with the server restarted at turns 50, 100 and 150 (LCKV_LONG_RUN=1, 6-8 minutes on
  2 shared cores): nothing lost, and the store's bytes per turn, which stay flat.
"""

from __future__ import annotations

import os
import re
import signal
import time
from dataclasses import replace

import pytest
from gradio_client import Client

from app_support.tiny import tiny_random_model
from lckv_stream.chat import ChatSession
from lckv_stream.conversation import COMPLETE, CUT
from lckv_stream.sampling import SamplingSettings
from lckv_stream.store import DB_NAME, ConversationStore
from served_app import local_client, serve_in_process, start_subprocess, stop_process

CHAT, STATUS, NUMBERS = 0, 1, 4  # in what /open, /send and /respond return
OPEN_BROWSER, SEND_BROWSER = 5, 6  # the browser state: what the page keeps in localStorage
WINDOW = 64


def app_env(data_dir) -> dict[str, str]:
    return {"LCKV_MODEL": "tiny-random", "LCKV_WINDOW": str(WINDOW), "LCKV_DATA_DIR": str(data_dir),
            "HF_HUB_OFFLINE": "1"}


def text_of(message: dict) -> str:
    return "".join(part["text"] for part in message["content"])


def send(client: Client, message: str) -> tuple:
    sent = client.predict(message, "", 4, WINDOW, None, api_name="/send")
    assert not sent[STATUS].startswith("⚠️"), sent[STATUS]
    return sent


def streamed(status: str) -> int:
    """Tokens streamed so far, from the status line ("Streaming… 57 tokens"); 0 before."""
    found = re.match(r"Streaming… (\d+) tokens", status)
    return int(found.group(1)) if found else 0


def turn(client: Client, message: str, max_new_tokens: int, temperature: float = 0.7) -> tuple:
    """Send, then the reply: (what Send returned, the reply's final outputs)."""
    sent = send(client, message)
    reply = client.submit(max_new_tokens, temperature, 0.9, api_name="/respond").result(timeout=120)
    assert reply[STATUS].startswith("Done:"), reply[STATUS]
    return sent, reply


def test_the_app_killed_mid_reply_keeps_every_finished_message_and_the_cut_reply(tmp_path):
    env, log = app_env(tmp_path / "data"), tmp_path / "app.log"
    process, url = start_subprocess(env, log)
    try:
        client = local_client(url)
        client.predict(None, api_name="/open")
        sent, first = turn(client, "first", max_new_tokens=6, temperature=0.0)
        kept = sent[SEND_BROWSER]["value"]
        # Greedy, the tiny model never ends its reply to "hello": it streams until the process dies.
        send(client, "hello")
        job = client.submit(4096, 0.0, 0.9, api_name="/respond")
        deadline = time.monotonic() + 60
        while not any(streamed(out[STATUS]) >= 100 for out in job.outputs()):
            assert time.monotonic() < deadline, "the reply did not stream"
            time.sleep(0.02)
        time.sleep(0.6)  # past the writer's flush interval: what was streamed is on disk
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        stop_process(process)

    # Started again in this process: the same app on the same folder, without importing it all again.
    with serve_in_process(model="tiny-random", window=WINDOW, data_dir=str(tmp_path / "data")) as served:
        client = local_client(served.url)
        reopened = client.predict(kept, api_name="/open")
        assert reopened[STATUS].startswith("Restored 4 messages (2 turns) from the store; the last reply was cut off "
                                           "when the server stopped while writing it")
        shown = [text_of(m) for m in reopened[CHAT]]
        assert shown[:2] == [text_of(m) for m in first[CHAT]] and shown[2] == "hello" and len(shown[3]) > 0
        _, after = turn(client, "go on", max_new_tokens=8, temperature=0.0)
        assert after[NUMBERS]["messages"] == 6

    with ConversationStore(tmp_path / "data" / DB_NAME) as store:
        stored = store.load(kept["current"], kept["owner"])
    assert [(m.role, m.status) for m in stored.messages] == [
        ("user", COMPLETE), ("assistant", COMPLETE), ("user", COMPLETE), ("assistant", CUT),
        ("user", COMPLETE), ("assistant", COMPLETE)]
    assert len(stored.messages[3].tokens) >= 64  # flushed every 32 tokens
    # The turn after the crash is the one a session rebuilt from the stored transcript gives.
    model, tokenizer = tiny_random_model()
    rebuilt = ChatSession(model, tokenizer)
    rebuilt.restore(replace(stored, messages=stored.messages[:4]))
    reply = list(rebuilt.send("go on", SamplingSettings(temperature=0.0, top_p=0.9, max_new_tokens=8)))[-1].reply
    assert stored.messages[5].content == reply and rebuilt.transcript == stored.transcript


TURNS, RESTARTS = 200, (50, 100, 150)


@pytest.mark.skipif(os.environ.get("LCKV_LONG_RUN") != "1", reason="6-8 minutes: run with LCKV_LONG_RUN=1")
def test_200_turns_with_three_restarts_lose_nothing_and_the_store_grows_linearly(tmp_path):
    env, log, path = app_env(tmp_path / "data"), tmp_path / "app.log", tmp_path / "data" / DB_NAME
    kept, sizes, started = None, [], time.monotonic()
    for start, end in zip((0,) + RESTARTS, RESTARTS + (TURNS,)):
        process, url = start_subprocess(env, log)
        try:
            client = local_client(url)
            opened = client.predict(kept, api_name="/open")
            assert opened[NUMBERS]["messages"] == 2 * start, opened[STATUS]
            for number in range(start, end):
                sent, reply = turn(client, f"turn {number}: tell me something", max_new_tokens=32)
                kept = sent[SEND_BROWSER].get("value", kept)  # set by the conversation's first message
                assert reply[NUMBERS]["messages"] == 2 * (number + 1)
        finally:
            stop_process(process)
        with ConversationStore(path) as store:
            store.checkpoint()
            stored = store.load(kept["current"], kept["owner"])
            sizes.append((end, store.file_bytes(), len(stored.transcript)))
        assert [m.content for m in stored.messages[::2]] == [f"turn {n}: tell me something" for n in range(end)]
        assert all(m.status == COMPLETE for m in stored.messages)
    steps = [(b1 - b0) / (t1 - t0) for (t0, b0, _), (t1, b1, _) in zip([(0, 0, 0)] + sizes, sizes)]
    print(f"\n{TURNS} turns, restarts at {', '.join(map(str, RESTARTS))}: {time.monotonic() - started:.0f} s; "
          f"store {sizes[-1][1]:,} bytes, {sizes[-1][1] / TURNS:,.0f} bytes a turn ({sizes[-1][2]:,} tokens, "
          f"{sizes[-1][2] / TURNS:.1f} a turn); bytes a turn by segment: " + ", ".join(f"{s:,.0f}" for s in steps))
    # Linear: the same bytes a turn after the first segment (which also holds the file's own pages),
    # give or take SQLite's 4 KB pages: three of them over a segment.
    assert max(steps[1:]) - min(steps[1:]) <= 3 * 4096 / (RESTARTS[1] - RESTARTS[0]) and max(steps) == steps[0]
