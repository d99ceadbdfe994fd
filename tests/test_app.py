"""The real app (app.py) served on a local port with the tiny random model, driven through gradio_client.

Events that stream a reply return (chat, status, metrics table, latency plot, raw metrics); the plot
comes as a Gradio update ({"__type__": "update", "value": ...}, no "value" when an update leaves it as
it is; see app.as_update).
"""

from __future__ import annotations

import re
import threading
import time

import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

import app as app_module
from served_app import serve_in_process

WINDOW = 64
CHAT, STATUS, PANEL, PLOT, NUMBERS = range(5)  # what the reply events return over the API
# Greedy decoding of this prompt on the tiny model never reaches its end-of-turn token: a reply that
# runs until stopped.
ENDLESS = dict(message="hello", temperature=0.0, max_new_tokens=4096)


@pytest.fixture(scope="module")
def served():
    with serve_in_process(model="tiny-random", window=WINDOW, max_generations=2, idle_minutes=30) as server:
        yield server


@pytest.fixture
def chat_app(served):
    return served.app


@pytest.fixture
def client(served):
    return Client(served.url, verbose=False)


def send(client: Client, message: str, system_prompt: str = "", sink: int = 4, window: int = WINDOW):
    """The Send step: (message box, chat shown, status)."""
    return client.predict(message, [], system_prompt, sink, window, api_name="/send")


def respond(client: Client, max_new_tokens: int = 12, temperature: float = 0.7, top_p: float = 0.9):
    return client.submit(max_new_tokens, temperature, top_p, api_name="/respond")


def updates(job) -> list:
    job.result(timeout=120)
    return job.outputs()


def turn(client: Client, message: str, system_prompt: str = "", sink: int = 4, window: int = WINDOW, **sampling) -> list:
    """Send, then the streamed reply's updates; the settings go with the message, as in the UI."""
    send(client, message, system_prompt, sink, window)
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
    chat, draft, status = send(client, ENDLESS["message"])
    assert draft == "" and text_of(chat[-1]) == ENDLESS["message"]
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


def test_the_empty_plot_already_has_numeric_axes(client):
    """The page fixes the plot's scales from its first frame: an untyped empty frame made them categorical."""
    plot = updated(client.predict(api_name="/open")[PLOT])
    assert plot["data"] == [] and plot["datatypes"] == {"token": "quantitative", "latency_ms": "quantitative"}


def test_gradio_holds_one_config_per_component_however_many_turns(served, client):
    """Gradio 6.31 keeps a new config (value included) for a component that gets a plain value or is
    read as an input after a gr.skip() of it: a chat, a plot and a message box per turn grew the
    server 20% over 500 turns (see app.as_update)."""
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
    clients = {prompt: Client(served.url, verbose=False) for prompt in ("You are a pirate.", "You are a robot.")}
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
    runners = [Client(served.url, verbose=False) for _ in range(chat_app.slots.limit)]
    jobs = []
    for runner in runners:
        send(runner, ENDLESS["message"])
        jobs.append(respond(runner, max_new_tokens=ENDLESS["max_new_tokens"], temperature=ENDLESS["temperature"]))
    wait_for(chat_app.slots.full)
    waiting = Client(served.url, verbose=False)
    _, _, status = send(waiting, "my turn?")
    assert "Busy" in status and "queued" in status
    queued = respond(waiting, max_new_tokens=4)
    for runner in runners:
        runner.predict(api_name="/stop")
    assert updates(queued)[-1][STATUS].startswith("Done:")
    assert all("stopped" in updates(job)[-1][STATUS] for job in jobs)


def test_empty_message_is_refused_and_nothing_changes(client, chat_app):
    turn(client, "first")
    before = chat_app.registry.peek(client.session_hash).messages
    for empty in ("", "   \n\t "):
        with pytest.raises(AppError, match="the message is empty"):
            send(client, empty)
    assert chat_app.registry.peek(client.session_hash).messages == before


def test_control_characters_are_stripped(client, chat_app):
    chat, _, _ = send(client, "hi\x00\x07 there\x1b")
    assert text_of(chat[-1]) == "hi there"
    updates(respond(client))
    assert chat_app.registry.peek(client.session_hash).messages[0]["content"] == "hi there"


def test_out_of_range_settings_say_which_and_why(client, chat_app):
    with pytest.raises(AppError, match="maximum"):
        client.predict(12, 5.0, 0.9, api_name="/respond")
    with pytest.raises(AppError, match="minimum"):
        send(client, "hello", window=1)
    with pytest.raises(AppError, match="maximum"):
        send(client, "hello", sink=1000)
    assert chat_app.registry.peek(client.session_hash) is None  # refused before reaching the app
    with pytest.raises(AppError, match="system prompt is too long"):
        send(client, "hello", system_prompt="Be nice. " * 3000)
    assert chat_app.registry.peek(client.session_hash).messages == []


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


def test_an_error_mid_turn_puts_the_message_back_and_keeps_the_transcript(client, chat_app):
    turn(client, "first")
    before = chat_app.registry.peek(client.session_hash).messages
    send(client, ENDLESS["message"])
    running = respond(client, max_new_tokens=ENDLESS["max_new_tokens"], temperature=ENDLESS["temperature"])
    wait_for(lambda: len(running.outputs()) >= 2)
    # A second reply in the same session while one streams: the engine refuses it (busy).
    status = client.predict(12, 0.7, 0.9, api_name="/respond")[STATUS]
    assert status.startswith("⚠️ busy") and client.predict(api_name="/restore_draft") == ENDLESS["message"]
    client.predict(api_name="/stop")
    updates(running)
    after = chat_app.registry.peek(client.session_hash).messages
    assert after[: len(before)] == before and after[len(before)]["content"] == ENDLESS["message"]


def test_settings_change_explains_itself_and_applies_next_turn(client, chat_app):
    turn(client, "first")
    status = client.predict("Answer in French.", 8, 128, api_name="/configure")
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
