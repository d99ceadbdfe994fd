"""The real app (app.py) served on a local port with the tiny random model, driven through gradio_client.

Events that stream a reply return (chat, status, metrics table, latency plot, raw metrics); Send
returns the same and the message box. The plot comes as a Gradio update ({"__type__": "update",
"value": ...}, no "value" when an update leaves it as it is; see handlers.as_update).
"""

from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import pytest
from gradio_client import Client, handle_file

import app as app_module
from served_app import fill_transcript, local_client, serve_in_process

WINDOW = 64
CHAT, STATUS, PANEL, PLOT, NUMBERS = range(5)  # what the reply events return over the API
BOX = 5  # Send's sixth output: the message box
# Greedy decoding of this prompt on the tiny model never reaches its end-of-turn token: a reply that
# runs until stopped.
ENDLESS = dict(message="hello", temperature=0.0, max_new_tokens=4096)


@pytest.fixture(scope="module")
def served():
    # A closed API client's session ends at the server's next heartbeat (default: every 15 s).
    heartbeat = pytest.MonkeyPatch()
    heartbeat.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.5")
    with serve_in_process(model="tiny-random", window=WINDOW, max_generations=2, idle_minutes=30) as server:
        yield server
    heartbeat.undo()


@pytest.fixture
def chat_app(served):
    return served.app


@pytest.fixture
def client(served):
    return local_client(served.url)


def send(client: Client, message, system_prompt="", sink=4, window=WINDOW, seed=None):
    """The Send step: (chat shown, status, panel, plot, numbers, message box)."""
    return client.predict(message, system_prompt, sink, window, seed, api_name="/send")


def respond(client: Client, max_new_tokens: int = 12, temperature: float = 0.7, top_p: float = 0.9):
    return client.submit(max_new_tokens, temperature, top_p, api_name="/respond")


def updates(job) -> list:
    job.result(timeout=120)
    return job.outputs()


def turn(client: Client, message: str, system_prompt: str = "", sink: int = 4, window: int = WINDOW,
         seed=None, **sampling) -> list:
    """Send, then the streamed reply's updates; the settings go with the message, as in the UI."""
    sent = send(client, message, system_prompt, sink, window, seed)
    assert not sent[STATUS].startswith("⚠️"), sent[STATUS]
    return updates(respond(client, **sampling))


def updated(output: dict):
    """The value an update output carries, or None when it leaves the component as shown."""
    assert output["__type__"] == "update"
    return output.get("value")


def text_of(message: dict) -> str:
    return "".join(part["text"] for part in message["content"])


def wait_for(condition, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_a_turn_streams_partial_updates_with_live_metrics(client, chat_app):
    sent = send(client, ENDLESS["message"])
    assert sent[BOX] == "" and text_of(sent[CHAT][-1]) == ENDLESS["message"]
    outs = updates(respond(client, max_new_tokens=200, temperature=ENDLESS["temperature"]))
    streaming = [out for out in outs if out[STATUS].startswith("Streaming")]
    assert len(streaming) > 1
    # The reply grows as tokens arrive, and the metrics panel and the latency plot move with it.
    replies = [text_of(out[CHAT][-1]) for out in streaming]
    assert all(later.startswith(earlier) for earlier, later in zip(replies, replies[1:])) and replies[-1] != replies[0]
    held = [out[NUMBERS]["tokens_held"] for out in streaming]
    assert held == sorted(held) and held[-1] > held[0]
    # The plot is redrawn at the first token, then at most every PLOT_EVERY_S.
    points = [len(updated(out[PLOT])["data"]) for out in streaming if updated(out[PLOT]) is not None]
    assert points[0] == streaming[0][NUMBERS]["tokens_generated"] and points == sorted(points)
    assert outs[-1][STATUS] == "Done: 200 tokens, reached the max new tokens setting."
    assert len(updated(outs[-1][PLOT])["data"]) == 200


def test_a_conversation_comes_back_through_the_api_and_moves_to_another_browser_as_a_file(served):
    """/open takes the browser state it returned before (what the page keeps in localStorage); /export
    and /import carry the conversation file through Gradio's file handling."""
    browser, listed = 6, 7  # in what /send returns; /open returns them at 5 and 6
    first = local_client(served.url)
    assert first.predict(None, api_name="/open")[browser - 1]["value"]["current"] is None
    sent = send(first, "keep this")
    kept = sent[browser]["value"]
    assert [tuple(c) for c in sent[listed]["choices"]] == [("keep this", kept["current"])]
    reply = updates(respond(first))[-1][CHAT]
    first.close()
    reloaded = local_client(served.url)
    reopened = reloaded.predict(kept, api_name="/open")
    assert reopened[STATUS].startswith("Restored 2 messages (1 turn) from the store")
    assert [text_of(m) for m in reopened[CHAT]] == [text_of(m) for m in reply]
    exported = reloaded.predict(api_name="/export")[0]["value"]
    other = local_client(served.url)
    assert other.predict(None, api_name="/open")[listed - 1]["choices"] == []
    imported = other.predict(handle_file(exported), api_name="/import")
    assert imported[STATUS].startswith("Imported “keep this”: 2 messages (1 turn)")
    (title, copy), = imported[listed - 1]["choices"]
    assert title == "keep this" and copy != kept["current"]


def test_the_empty_plot_already_has_numeric_axes(client):
    """The page fixes the plot's scales from its first frame: an untyped empty frame made them categorical."""
    plot = updated(client.predict(None, api_name="/open")[PLOT])
    assert plot["data"] == [] and plot["datatypes"] == {"token": "quantitative", "latency_ms": "quantitative"}


def test_gradio_holds_one_config_per_component_however_many_turns(served, client, monkeypatch):
    """Gradio 6.31 keeps a new config (value included) for a component that gets a plain value or is
    read as an input after a gr.skip() of it: a chat, a plot and a message box per turn grew the
    server 20% over 500 turns (see handlers.as_update)."""
    import app_support.handlers

    monkeypatch.setattr(app_support.handlers, "STREAM_EVERY_S", 0.0)  # a view per token: plots skipped between
    configs = lambda: len(served.demo.state_holder[client.session_hash].config_values)  # noqa: E731
    turn(client, "one", max_new_tokens=20, temperature=0.0)
    before = configs()
    for message in ("two", "three", "four"):
        outs = turn(client, message, max_new_tokens=20, temperature=0.0)
        assert any(updated(out[PLOT]) is None for out in outs)  # the plot was skipped between redraws
    assert configs() == before


def test_final_metrics_are_the_engines(client, chat_app):
    outs = turn(client, "How are you today?")
    numbers, table = outs[-1][NUMBERS], outs[-1][PANEL]
    stats = chat_app.registry.peek(client.session_hash).stats()
    assert numbers["cache_mb"] == stats.cache.allocated_mb
    assert numbers["tokens_held"] == stats.cache.tokens_held
    assert numbers["conversation_tokens"] == stats.conversation_tokens
    assert numbers["dense_cache_mb"] == stats.dense_bytes / 2**20
    assert numbers["device"] == "CPU (no GPU)" and numbers["gpu_memory_mb"] is None
    assert f"{stats.cache.allocated_mb:.2f} MB" in table and "CPU (no GPU)" in table
    turn_metrics = chat_app.registry.peek(client.session_hash).metrics.last_turn
    assert numbers["last_turn"]["ttft_ms"] == turn_metrics.ttft_ms
    assert numbers["last_turn"]["tokens_per_s"] == turn_metrics.tokens_per_s


def test_two_clients_at_once_do_not_share_anything(served, chat_app):
    clients = {prompt: local_client(served.url) for prompt in ("You are a pirate.", "You are a robot.")}
    results = {}

    def chat(prompt: str, client: Client) -> None:
        results[prompt] = turn(client, f"question under {prompt}", system_prompt=prompt, max_new_tokens=20)

    threads = [threading.Thread(target=chat, args=item) for item in clients.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    for prompt, client in clients.items():
        session = chat_app.registry.peek(client.session_hash)
        assert session.system_prompt == prompt
        assert [m["content"] for m in session.messages if m["role"] == "user"] == [f"question under {prompt}"]
        shown = results[prompt][-1][0]
        assert [text_of(m) for m in shown if m["role"] == "user"] == [f"question under {prompt}"]
        # The Chatbot shows tabs as spaces; the random model's replies have some.
        assert text_of(shown[-1]).split() == session.messages[-1]["content"].split()
    sessions = [chat_app.registry.peek(c.session_hash) for c in clients.values()]
    assert sessions[0] is not sessions[1] and sessions[0].transcript != sessions[1].transcript


def test_stop_ends_the_reply_and_the_session_stays_usable(client, chat_app):
    send(client, ENDLESS["message"])
    job = respond(client, max_new_tokens=ENDLESS["max_new_tokens"], temperature=ENDLESS["temperature"])
    wait_for(lambda: len(job.outputs()) >= 3)
    client.predict(api_name="/stop")
    outs = updates(job)
    assert "stopped" in outs[-1][STATUS]
    session = chat_app.registry.peek(client.session_hash)
    assert session.metrics.last_turn.stop_reason == "stopped"
    assert session.stats().cache.tokens_seen == len(session.transcript)
    outs = turn(client, "still there?")
    assert outs[-1][STATUS].startswith("Done:") and len(session.messages) == 4


def test_busy_message_when_every_generation_slot_is_taken(served, chat_app):
    runners = [local_client(served.url) for _ in range(chat_app.slots.limit)]
    jobs = []
    for runner in runners:
        send(runner, ENDLESS["message"])
        jobs.append(respond(runner, max_new_tokens=ENDLESS["max_new_tokens"], temperature=ENDLESS["temperature"]))
    wait_for(chat_app.slots.full)
    waiting = local_client(served.url)
    status = send(waiting, "my turn?")[STATUS]
    assert "Busy" in status and "queued" in status
    queued = respond(waiting, max_new_tokens=4)
    for runner in runners:
        runner.predict(api_name="/stop")
    assert updates(queued)[-1][STATUS].startswith("Done:")
    assert all("stopped" in updates(job)[-1][STATUS] for job in jobs)


def test_empty_message_is_a_notice_and_nothing_changes(client, chat_app):
    """No Gradio error (red badges on every output): a notice in the status, the text stays in the box,
    and the reply step that follows Send on the page only repeats it."""
    turn(client, "first")
    before = chat_app.registry.peek(client.session_hash).messages
    for empty in ("", "   \n\t "):
        sent = send(client, empty)
        assert sent[STATUS] == "⚠️ the message is empty: type something to send" and sent[BOX] == empty
        assert [text_of(m).strip() for m in sent[CHAT]] == [m["content"].strip() for m in before]
        assert updates(respond(client))[-1][STATUS] == sent[STATUS]
    assert chat_app.registry.peek(client.session_hash).messages == before


def test_a_message_is_answered_once(client, chat_app):
    turn(client, "only once")
    again = client.predict(12, 0.7, 0.9, api_name="/respond")
    assert again[STATUS] == "⚠️ there is no message to answer: send one first (each message is answered once)"
    assert len(chat_app.registry.peek(client.session_hash).messages) == 2
    fresh = local_client(client.src)
    assert fresh.predict(12, 0.7, 0.9, api_name="/respond")[STATUS].startswith("⚠️ there is no message to answer")


def test_control_characters_are_stripped(client, chat_app):
    chat = send(client, "hi\x00\x07 there\x1b")[CHAT]
    assert text_of(chat[-1]) == "hi there"
    updates(respond(client))
    assert chat_app.registry.peek(client.session_hash).messages[0]["content"] == "hi there"


@pytest.mark.parametrize("field, value, expected", [
    ("sink", "abc", "sink must be a whole number between 0 and 64, got 'abc'"),
    ("sink", None, "sink must be a whole number between 0 and 64, got None"),
    ("window", 1, "window must be between 16 and 8192, got 1"),
    ("sink", 1000, "sink must be between 0 and 64, got 1000"),
    ("window", 100.5, "window must be a whole number, got 100.5"),
    ("seed", "x", "seed must be a whole number between 0 and 9223372036854775807, got 'x'"),
    ("message", None, "a message must be text, got NoneType"),
    ("message", 42, "a message must be text, got int"),
    ("system_prompt", 7, "the system prompt must be text, got int"),
    ("system_prompt", "Be nice. " * 3000, "the system prompt is too long: keep it under 4096 tokens"),
])
def test_bad_send_values_get_clear_notices(client, chat_app, field, value, expected):
    values = dict(message="hello", system_prompt="", sink=4, window=WINDOW, seed=None) | {field: value}
    sent = client.predict(*values.values(), api_name="/send")
    assert sent[STATUS] == f"⚠️ {expected}"
    assert chat_app.registry.peek(client.session_hash).messages == []


@pytest.mark.parametrize("values, expected", [
    ((12, "abc", 0.9), "temperature must be a number between 0 and 2, got 'abc'"),
    ((None, 0.7, 0.9), "max_new_tokens must be a whole number between 1 and 4096, got None"),
    ((12, 5.0, 0.9), "temperature must be between 0 and 2, got 5.0"),
])
def test_bad_reply_settings_get_clear_notices_and_the_message_back(client, chat_app, values, expected):
    send(client, "hello")
    assert client.predict(*values, api_name="/respond")[STATUS] == f"⚠️ {expected}"
    assert client.predict(api_name="/restore_draft") == "hello"
    assert chat_app.registry.peek(client.session_hash).messages == []
    assert client.predict("abc", 0.7, 0.9, 0.9, api_name="/long_conversation")[STATUS] == (
        "⚠️ turns must be a whole number between 5 and 500, got 'abc'")
    assert client.predict(None, 0.7, 0.9, api_name="/regenerate")[STATUS].startswith("⚠️ max_new_tokens must be")


def raw_call(url: str, api_name: str, body: bytes) -> str:
    """Gradio's REST API with a body written by hand, as any HTTP client may send it: the final event."""
    direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(f"{url}gradio_api/call/{api_name}", data=body,
                                     headers={"Content-Type": "application/json"})
    event_id = json.loads(direct.open(request, timeout=30).read())["event_id"]
    with direct.open(f"{url}gradio_api/call/{api_name}/{event_id}", timeout=60) as stream:
        text = stream.read().decode()
    return text.rsplit("data:", 1)[-1].strip()


def test_a_lone_surrogate_gets_a_clear_notice(served, capfd):
    """JSON can carry half of a UTF-16 surrogate pair ("\\ud800"): it is not text and cannot be encoded
    back; echoing it made the server fail mid-response and the client was cancelled."""
    # Over the REST API every output comes back, the page's states and buttons too.
    status, box = 2, 9
    body = b'{"data": ["hi \\ud800 there", "", 4, 64, null]}'
    outputs = json.loads(raw_call(served.url, "send", body))
    assert outputs[status] == ("⚠️ the message holds an invalid character at position 3 (a lone UTF-16 "
                               "surrogate, '\\ud800'): remove it and send again")
    assert outputs[box] == "hi \ufffd there"
    system = b'{"data": ["hi", "\\udfff", 4, 64, null]}'
    assert "the system prompt holds an invalid character" in json.loads(raw_call(served.url, "send", system))[status]
    assert "Traceback" not in capfd.readouterr().err


def test_user_errors_leave_no_traceback_in_the_server_log(client, capfd):
    send(client, "")
    send(client, "hi", sink="abc")
    client.predict(12, "hot", 0.9, api_name="/respond")
    client.predict(api_name="/undo")
    client.predict(api_name="/restore_draft")
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out


def test_a_100k_token_paste_is_read_in_chunks_into_the_bounded_cache(client, chat_app):
    paste = "The quick brown fox jumps over the lazy dog. " * 2900
    session = chat_app.registry.get(client.session_hash)[0]
    assert len(session.format.encode(paste)) >= 100_000
    send(client, paste)
    outs = updates(respond(client, max_new_tokens=4))
    reading = [re.search(r"([\d,]+) / ([\d,]+) tokens", out[STATUS]) for out in outs if out[STATUS].startswith("Reading")]
    assert len(reading) > 100 and reading[-1].group(1) == reading[-1].group(2)
    assert int(reading[-1].group(2).replace(",", "")) >= 100_000
    assert outs[-1][STATUS].startswith("Done:")
    numbers = outs[-1][NUMBERS]
    assert numbers["conversation_tokens"] > 100_000
    assert numbers["tokens_held"] == numbers["sink"] + numbers["window"]
    assert session.messages[0]["content"] == paste


def test_a_second_message_while_a_reply_streams_is_refused_and_the_transcript_kept(client, chat_app):
    turn(client, "first", temperature=0.0)  # a sampled first reply could lead the greedy one below to its end
    before = chat_app.registry.peek(client.session_hash).messages
    send(client, ENDLESS["message"])
    running = respond(client, max_new_tokens=ENDLESS["max_new_tokens"], temperature=ENDLESS["temperature"])
    wait_for(lambda: len(running.outputs()) >= 2)
    # Another message or reply in the same session while one streams is refused; the text stays in the box.
    refused = send(client, "not now")
    assert refused[STATUS].startswith("⚠️ a reply is still being written") and refused[BOX] == "not now"
    assert client.predict(6, 0.7, 0.9, api_name="/regenerate")[STATUS].startswith("⚠️ busy")
    client.predict(api_name="/stop")
    updates(running)
    after = chat_app.registry.peek(client.session_hash).messages
    assert after[: len(before)] == before and after[len(before)]["content"] == ENDLESS["message"]


class FailingEngine:
    """The session's engine, except that reading a message fails as running out of memory does."""

    def __init__(self, engine) -> None:
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def prefill(self, row, ids, chunk, stop):
        from lckv_stream.engine import EngineError, JobStream

        stream = JobStream()
        stream.fail(EngineError("out of memory while reading the message"))
        return stream


def test_an_engine_failure_puts_the_message_back_and_keeps_the_transcript(client, chat_app):
    turn(client, "first")
    session = chat_app.registry.peek(client.session_hash)
    before = session.messages
    session.engine = FailingEngine(session.engine)
    try:
        send(client, "this one fails")
        outs = updates(respond(client))
    finally:
        session.engine = session.engine._engine
    assert outs[-1][STATUS].startswith("⚠️ out of GPU memory while answering: nothing from this turn was kept")
    assert client.predict(api_name="/restore_draft") == "this one fails"
    assert session.messages == before
    assert turn(client, "works again")[-1][STATUS].startswith("Done:")


def test_settings_change_explains_itself_and_applies_next_turn(client, chat_app):
    turn(client, "first")
    status = client.predict("Answer in French.", 8, 128, None, api_name="/configure")
    assert "system prompt updated" in status and "next turn" in status
    session = chat_app.registry.peek(client.session_hash)
    assert session.system_prompt == "Answer in French." and session.cache_settings.window == 128
    outs = turn(client, "second", system_prompt="Answer in French.", sink=8, window=128)
    assert outs[-1][NUMBERS]["window"] == 128 and outs[-1][NUMBERS]["sink"] >= 8


def test_undo_regenerate_and_clear(client, chat_app):
    turn(client, "one")
    turn(client, "two")
    session = chat_app.registry.peek(client.session_hash)
    chat, *_ = client.predict(api_name="/undo")
    assert [text_of(m) for m in chat if m["role"] == "user"] == ["one"] and len(session.messages) == 2
    outs = updates(client.submit(6, 1.0, 0.9, api_name="/regenerate"))
    assert outs[-1][STATUS].startswith("Done:") and len(session.messages) == 2
    chat, status, *_ = client.predict(api_name="/clear")
    assert chat == [] and session.messages == [] and status == "New conversation."
    assert client.predict(api_name="/undo")[STATUS] == "⚠️ there is nothing to undo"
    assert client.predict(6, 0.7, 0.9, api_name="/regenerate")[STATUS] == "⚠️ there is no reply to regenerate yet"


def test_long_conversation_keeps_the_cache_memory_flat(client, chat_app):
    outs = updates(client.submit(10, 6, 0.7, 0.9, api_name="/long_conversation"))
    ends = [out[NUMBERS] for out in outs if ": Done:" in out[STATUS]]
    assert len(ends) == 10 and outs[-1][STATUS].startswith("Long conversation done: 10 turns")
    assert len({numbers["cache_mb"] for numbers in ends}) == 1
    assert ends[-1]["conversation_tokens"] > ends[-1]["tokens_held"] == ends[-1]["sink"] + ends[-1]["window"]


def test_config_comes_from_the_environment():
    config = app_module.AppConfig.from_env(
        {"LCKV_MODEL": "tiny-random", "LCKV_IDLE_MINUTES": "0.5", "LCKV_MAX_GENERATIONS": "3"}
    )
    assert (config.model, config.idle_minutes, config.max_generations) == ("tiny-random", 0.5, 3)
    assert app_module.AppConfig.from_env({"LCKV_MODEL": "x"}, model="tiny-random").model == "tiny-random"
    with pytest.raises(ValueError, match="LCKV_WINDOW must be int"):
        app_module.AppConfig.from_env({"LCKV_WINDOW": "big"})
    with pytest.raises(ValueError, match="window"):
        app_module.AppConfig.from_env({"LCKV_WINDOW": "0"})


def test_fresh_sessions_reply_differently_and_a_seed_replays(served):
    """Each conversation draws its own random seed; the seed setting makes replies reproducible."""
    def reply(seed=None, client=None) -> str:
        client = client or local_client(served.url)
        return text_of(turn(client, "Tell me a story.", seed=seed, max_new_tokens=24, temperature=0.7)[-1][CHAT][-1])

    assert reply() != reply()
    fixed = reply(seed=1234)
    assert reply(seed=1234) == fixed != reply(seed=99)
    # A new conversation (Clear) with the seed set replays the first reply too.
    replayed = local_client(served.url)
    assert reply(seed=1234, client=replayed) == fixed
    replayed.predict(api_name="/clear")
    assert reply(seed=1234, client=replayed) == fixed


def test_the_panel_explains_a_raised_sink_and_resets_on_clear(client, chat_app):
    outs = turn(client, "hello there", system_prompt="You are a very helpful assistant who answers briefly.", sink=4)
    numbers, table = outs[-1][NUMBERS], outs[-1][PANEL]
    session = chat_app.registry.peek(client.session_hash)
    assert numbers["sink_setting"] == 4 and numbers["sink"] == numbers["pinned_tokens"] == session.stats().cache.sink > 4
    assert (f"sink {numbers['sink']} + window {WINDOW}; sink set to 4, raised to the {numbers['pinned_tokens']} tokens"
            " of the pinned start: system prompt and chat template header") in table
    assert f"{numbers['cache_used_mb']:.2f} MB of it in use" in table and numbers["cache_used_mb"] > 0
    assert "**Server (all users)**" in table and "MB for" in table
    chat, status, table, plot, numbers = client.predict(api_name="/clear")
    assert chat == [] and numbers["last_turn"] is None and numbers["tokens_generated"] == 0
    assert "| Time to first token (last turn) | – |" in table and updated(plot)["data"] == []


def test_the_chats_own_clear_retry_and_undo_icons_act_on_the_conversation(served):
    """The Chatbot's trash, retry and undo icons are the Clear, Regenerate and Undo events."""
    config = served.demo.get_config_file()
    chat_id = next(c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "chat")
    targets = {dep["api_name"]: {tuple(t) for t in dep["targets"]} for dep in config["dependencies"]}
    assert (chat_id, "clear") in targets["clear"] and (chat_id, "retry") in targets["regenerate"]
    assert (chat_id, "undo") in targets["undo"]


def test_a_long_conversation_shows_its_latest_messages_and_earlier_ones_on_demand(client, chat_app):
    from app_support.chat_view import LATEST, MAX_SHOWN, PAGE

    client.predict(None, api_name="/open")
    fill_transcript(chat_app.registry.peek(client.session_hash), 160)
    outs = turn(client, "turn 160", max_new_tokens=1)
    shown = [text_of(m) for m in outs[-1][CHAT] if m["role"] == "user"]
    assert len(outs[-1][CHAT]) == LATEST and shown[-1] == "turn 160" and shown[0] == f"turn {161 - LATEST // 2}"
    views = [client.predict(api_name="/earlier") for _ in range(5)]
    firsts = [text_of(view[CHAT][0]) for view in views]
    assert firsts == [f"turn {161 - (LATEST + PAGE * k) // 2}" for k in range(1, 6)]
    assert all(len(view[CHAT]) <= MAX_SHOWN for view in views) and len(views[-1][CHAT]) == MAX_SHOWN
    first = 322 - LATEST - 5 * PAGE
    assert views[-1][STATUS] == f"Showing messages {first + 1:,}–{first + MAX_SHOWN:,} of 322."
    latest = client.predict(api_name="/latest")
    session = chat_app.registry.peek(client.session_hash)
    assert text_of(latest[CHAT][-1]).strip() == session.messages[-1]["content"].strip() and len(latest[CHAT]) == LATEST
    client.predict(api_name="/earlier")
    # A new reply brings the view back to the latest messages.
    assert len(turn(client, "and now?", max_new_tokens=1)[-1][CHAT]) == LATEST


def test_memory_is_given_back_after_bursts_of_users(served, chat_app):
    """Three bursts of 16 API users, each a turn with an 8,192-token window and a long message (bigger
    rows, and snapshots that hold thousands of tokens), every session closed after its burst: the
    process comes back down each time, and after the third is where it was after the first."""
    from lckv_stream.metrics import process_rss_mb

    def burst() -> tuple[float, float]:
        clients = [local_client(served.url) for _ in range(16)]
        threads = [threading.Thread(target=turn, args=(c, f"user {i}: " + "many words " * 300),
                                    kwargs=dict(window=8192, max_new_tokens=2))
                   for i, c in enumerate(clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        hashes = {c.session_hash for c in clients}
        assert hashes <= set(chat_app.registry._entries)
        opened = process_rss_mb()
        closing = [threading.Thread(target=c.close) for c in clients]  # each heartbeat ends: the unload event
        for thread in closing:                                              # closes the session
            thread.start()
        for thread in closing:
            thread.join(timeout=30)
        # Gradio's own state of each session goes too.
        wait_for(lambda: not hashes & (set(chat_app.registry._entries) | set(served.demo.state_holder.session_data)),
                 timeout_s=60)
        wait_for(lambda: not chat_app.registry.release_pending, timeout_s=30)  # once for all, soon after
        return opened, process_rss_mb()

    before = process_rss_mb()
    rounds = [burst() for _ in range(3)]
    print(f"\nRSS before {before:.0f} MB; bursts (open -> closed): "
          + ", ".join(f"{opened:.0f} -> {closed:.0f}" for opened, closed in rounds))
    assert rounds[2][1] <= rounds[0][1] * 1.10
    # The first burst leaves the server's one-time costs behind (about 50 MB); of what each later
    # burst adds on top of where the first left it, at least half goes when its sessions close.
    settled = rounds[0][1]
    assert all(closed - settled < 0.5 * (opened - settled) for opened, closed in rounds[1:])


def test_many_streaming_replies_are_redrawn_less_often_each():
    """One reply is redrawn 10 times a second; with many at once the server's views stay at about
    VIEWS_PER_S in all (they are built on the cores that decode), the plot slowed alike."""
    from app_support.handlers import PLOT_EVERY_S, STREAM_EVERY_S, VIEWS_PER_S, redraw_intervals

    assert redraw_intervals(1) == (STREAM_EVERY_S, PLOT_EVERY_S)
    for streaming in (2, 8, 64):
        every, plot_every = redraw_intervals(streaming)
        assert streaming / every <= max(VIEWS_PER_S, streaming / STREAM_EVERY_S) + 1e-9
        assert every >= STREAM_EVERY_S and plot_every / every == PLOT_EVERY_S / STREAM_EVERY_S
    assert redraw_intervals(8)[0] == 8 / VIEWS_PER_S
