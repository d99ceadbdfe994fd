import threading

import pytest
import torch

from app_support.tiny import tiny_model
from lckv_stream import cla_map, lckv_map
from lckv_stream.chat_format import ChatError
from lckv_stream.chat import CacheSettings, ChatSession, PrefillProgress, TokenEvent, TurnEnd
from lckv_stream.engine import RUN_AHEAD
from lckv_stream.metrics import process_rss_mb
from lckv_stream.sampling import SamplingSettings

GREEDY = SamplingSettings(temperature=0, max_new_tokens=6, repetition_penalty=1.0)


def session(tokenizer, layer_types=lckv_map(4), sink=4, window=64, **kwargs):
    model = tiny_model(layer_types, vocab_size=len(tokenizer))
    kwargs.setdefault("sampling", GREEDY)
    return ChatSession(model, tokenizer, cache_settings=CacheSettings(sink, window), seed=0, **kwargs)


def run(events):
    return list(events)


def test_a_turn_streams_tokens_then_ends(tokenizer):
    chat = session(tokenizer)
    events = run(chat.send("Hello there"))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert len(tokens) >= 1 and isinstance(events[-1], TurnEnd)
    end = events[-1]
    assert end.reply.startswith("".join(e.text for e in tokens))
    assert end.metrics.new_tokens == len(tokens) and end.metrics.ttft_ms > 0
    assert [m["role"] for m in chat.messages] == ["user", "assistant"]


def test_each_turn_encodes_only_its_own_tokens_and_cache_follows_transcript(tokenizer):
    chat = session(tokenizer, window=400)
    for text in ("first message", "second one", "third"):
        before = chat.stats().cache.tokens_seen
        run(chat.send(text))
        stats = chat.stats()
        assert stats.cache.tokens_seen == len(chat.transcript) == stats.conversation_tokens
        assert stats.cache.tokens_seen > before
    # The transcript is the template rendering of the conversation (generated ids kept as sampled).
    rendered = chat.format.render(chat.messages, add_generation_prompt=False)
    decoded = tokenizer.decode(chat.transcript)
    assert rendered.startswith(decoded[: decoded.rindex("<|im_start|>assistant")])


def test_stop_mid_stream_keeps_the_cache_consistent(tokenizer):
    chat = session(tokenizer, sampling=SamplingSettings(temperature=1.0, max_new_tokens=50, top_k=0, top_p=1.0))
    seen = []
    for event in chat.send("tell me a long story"):
        seen.append(event)
        if isinstance(event, TokenEvent) and event.index == 2:
            chat.stop()
    # The engine may have fed a few more tokens than were shown (it runs ahead of its reader by a
    # bounded amount): they are in the reply and the transcript, so the cache still matches.
    end = seen[-1]
    assert end.reason == "stopped" and 3 <= end.metrics.new_tokens <= 3 + RUN_AHEAD + 1
    assert end.reply == chat.messages[-1]["content"] == tokenizer.decode(chat.transcript[-end.metrics.new_tokens:], skip_special_tokens=True)
    assert chat.stats().cache.tokens_seen == len(chat.transcript)
    assert run(chat.send("and then?"))[-1].reason in ("eos", "max_new_tokens")


def test_abandoning_a_stream_releases_the_session(tokenizer):
    chat = session(tokenizer, sampling=SamplingSettings(temperature=1.0, max_new_tokens=50))
    stream = chat.send("hello")
    next(stream)
    assert chat.generating
    stream.close()
    assert not chat.generating
    assert chat.stats().cache.tokens_seen == len(chat.transcript)
    assert run(chat.send("again"))[-1].reason


def test_a_second_concurrent_turn_is_refused_as_busy(tokenizer):
    chat = session(tokenizer, sampling=SamplingSettings(temperature=1.0, max_new_tokens=50))
    stream = chat.send("hello")
    next(stream)
    with pytest.raises(ChatError, match="busy"):
        next(chat.send("me too"))
    with pytest.raises(ChatError, match="busy"):
        chat.undo()
    stream.close()


def test_undo_restores_the_exact_state(tokenizer):
    chat = session(tokenizer)
    run(chat.send("one"))
    transcript, messages = chat.transcript, chat.messages
    first = run(chat.send("two"))[-1].reply
    chat.undo()
    assert chat.transcript == transcript and chat.messages == messages
    assert run(chat.send("two"))[-1].reply == first  # greedy: same cache, same answer


def test_regenerate_replaces_only_the_reply(tokenizer):
    chat = session(tokenizer)
    run(chat.send("one"))
    reply = run(chat.send("two"))[-1].reply
    count = len(chat.messages)
    again = run(chat.regenerate())[-1].reply
    assert again == reply and len(chat.messages) == count
    with pytest.raises(ChatError, match="no reply"):
        fresh = session(tokenizer)
        fresh.regenerate()


def test_rebuild_after_resizing_equals_a_cache_built_with_that_size(tokenizer):
    # A CLA map has no iterated layers, so encoding the transcript at once is exact.
    chat = session(tokenizer, cla_map(4, 2), window=100)
    other = session(tokenizer, cla_map(4, 2), window=200)
    for text in ("one", "two", "three"):
        run(chat.send(text))
        run(other.send(text))
    assert len(chat.transcript) <= 100  # everything fit before the resize: the rebuild must be exact
    note = chat.configure(cache_settings=CacheSettings(4, 200))
    assert "next turn" in note
    assert run(chat.send("four"))[-1].reply == run(other.send("four"))[-1].reply
    assert chat.stats().cache.tokens_seen == len(chat.transcript)


def test_shrinking_the_window_keeps_the_pinned_prefix_and_latest_tokens(tokenizer):
    chat = session(tokenizer, window=100)
    for text in ("one", "two", "three"):
        run(chat.send(text))
    chat.configure(cache_settings=CacheSettings(4, 16))
    run(chat.send("four"))
    stats = chat.stats()
    # the sink grows to the pinned template header when that is longer than 4 tokens
    assert stats.cache.sink >= 4 and stats.cache.window == 16
    assert stats.cache.tokens_held == stats.cache.sink + 16
    assert stats.conversation_tokens == len(chat.transcript) > stats.cache.tokens_held


def test_system_prompt_is_pinned_in_the_sinks(tokenizer):
    chat = session(tokenizer, sink=2, window=16, system_prompt="You are a helpful assistant.")
    pinned = chat.format.pinned_prefix_length(chat.system_prompt)
    assert pinned > 2
    for i in range(6):
        run(chat.send(f"message number {i}"))
    held = chat.held_indices()  # stream indices held: the pinned prefix must all be there
    assert held[:pinned] == list(range(pinned))
    assert chat.stats().cache.tokens_held == pinned + 16 < len(chat.transcript)


def test_an_over_long_message_is_encoded_in_chunks_within_the_bound(tokenizer):
    chat = session(tokenizer, window=64)
    long_text = "streaming language models " * 400
    events = run(chat.send(long_text))
    progress = [e for e in events if isinstance(e, PrefillProgress)]
    assert len(progress) > 3 and progress[-1].done == progress[-1].total
    stats = chat.stats()
    assert stats.cache.tokens_held == stats.cache.sink + stats.cache.window
    assert stats.conversation_tokens == len(chat.transcript) > 1000
    assert chat.messages[0]["content"] == long_text


@pytest.mark.parametrize("message, fragment", [
    ("", "empty"), ("   \n", "empty"), (None, "must be text"), (42, "must be text"),
    ("hi \ud800", r"invalid character at position 3 \(a lone UTF-16 surrogate"),
])
def test_bad_messages_are_named(tokenizer, message, fragment):
    chat = session(tokenizer)
    with pytest.raises(ChatError, match=fragment):
        chat.send(message)
    assert chat.messages == []


def test_control_characters_are_removed(tokenizer):
    chat = session(tokenizer)
    run(chat.send("he\x00llo\x1b[31m"))
    assert chat.messages[0]["content"] == "hello[31m"


@pytest.mark.parametrize("field, value", [
    ("temperature", -0.1), ("temperature", 5), ("top_p", 0), ("top_k", -1), ("top_k", 2.5),
    ("repetition_penalty", 0.5), ("max_new_tokens", 0), ("max_new_tokens", 10**6), ("temperature", "hot"),
])
def test_out_of_range_sampling_settings_are_named(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingSettings(**{field: value})


@pytest.mark.parametrize("sink, window, fragment", [(-1, 8, "sink"), (4, 0, "window"), (4, 1 << 21, "window")])
def test_out_of_range_cache_settings_are_named(sink, window, fragment):
    with pytest.raises(ValueError, match=fragment):
        CacheSettings(sink, window)


def test_two_sessions_never_share_state(tokenizer):
    model = tiny_model(lckv_map(4), vocab_size=len(tokenizer))
    a = ChatSession(model, tokenizer, system_prompt="You are A.", sampling=GREEDY)
    b = ChatSession(model, tokenizer, system_prompt="You are B.", sampling=GREEDY)
    threads = [threading.Thread(target=run, args=(s.send(f"hi {i}"),)) for i, s in enumerate((a, b))]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert "You are A." in tokenizer.decode(a.transcript) and "You are B." not in tokenizer.decode(a.transcript)
    assert "You are B." in tokenizer.decode(b.transcript)


def test_two_thousand_turns_at_constant_cache_memory(tokenizer):
    chat = session(tokenizer, sink=4, window=48, sampling=SamplingSettings(temperature=0, max_new_tokens=2))
    sizes, rss = [], []
    for turn in range(2000):
        run(chat.send(f"turn {turn}"))
        if turn >= 9:
            stats = chat.stats().cache
            sizes.append((stats.allocated_bytes, stats.used_bytes, stats.tokens_held))
        if turn in (100, 1999):
            rss.append(process_rss_mb())
    assert len(set(sizes)) == 1, "cache bytes changed after turn 10"
    assert rss[1] - rss[0] < 25, f"process memory grew {rss[1] - rss[0]:.1f} MB"
    messages = chat.messages
    assert len(messages) == 4000
    assert [m["content"] for m in messages[0::2]] == [f"turn {t}" for t in range(2000)]
    assert chat.stats().conversation_tokens == len(chat.transcript)


def test_time_the_consumer_spends_between_tokens_is_not_latency(tokenizer):
    import time

    chat = session(tokenizer, sampling=SamplingSettings(temperature=0, max_new_tokens=4))
    latencies = []
    for event in chat.send("hello"):
        if isinstance(event, TokenEvent):
            latencies.append(event.latency_ms)
            time.sleep(0.2)  # a slow UI
    assert latencies and max(latencies) < 150


def test_sessions_answering_at_once_get_the_replies_each_gets_alone(tokenizer):
    """Four conversations on four threads through one engine (batched together) against the same
    conversations one after the other: seeded sampling and greedy, different windows and prompts."""
    from lckv_stream.engine import Engine, EngineSettings

    model = tiny_model(cla_map(4, 2), vocab_size=len(tokenizer))
    settings = [SamplingSettings(temperature=0.9, top_k=20, max_new_tokens=12),
                SamplingSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=12)]

    def conversation(engine, index: int) -> list[str]:
        chat = ChatSession(model, tokenizer, cache_settings=CacheSettings(4, 40 + 30 * index), seed=index,
                           engine=engine)
        return [run(chat.send(f"message {turn} from {index} " * (index + 1), settings[(index + turn) % 2]))[-1].reply
                for turn in range(4)]

    alone_engine = Engine(model, EngineSettings(max_batch=4))
    alone = [conversation(alone_engine, index) for index in range(4)]
    engine = Engine(model, EngineSettings(max_batch=4))
    together = [None] * 4
    threads = [threading.Thread(target=lambda i=i: together.__setitem__(i, conversation(engine, i))) for i in range(4)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert together == alone
    assert engine.stats().tokens > engine.stats().steps  # some steps served several conversations
def test_an_edit_replaces_a_message_and_drops_what_followed(tokenizer):
    chat = session(tokenizer, window=400)
    for text in ("one", "two", "three"):
        run(chat.send(text))
    reply = run(chat.edit(2, "TWO"))[-1].reply
    assert [m["content"] for m in chat.messages[::2]] == ["one", "TWO"] and len(chat.messages) == 4
    # The cache was rebuilt from the transcript: the same as a conversation that went this way.
    fresh = session(tokenizer, window=400)
    run(fresh.send("one"))
    assert run(fresh.send("TWO"))[-1].reply == reply and fresh.transcript == chat.transcript
    assert chat.stats().cache.tokens_seen == len(chat.transcript)
    # Editing the last message comes back from its checkpoint, with the same result.
    again = run(chat.edit(2, "TWO"))[-1].reply
    assert again == reply and chat.transcript == fresh.transcript


@pytest.mark.parametrize("index, text, fragment", [
    (1, "hi", "only your own messages"), (7, "hi", "no message 7"), (-1, "hi", "no message -1"),
    (0, "   ", "empty"), (True, "hi", "no message True"),
])
def test_a_bad_edit_is_refused_and_changes_nothing(tokenizer, index, text, fragment):
    chat = session(tokenizer)
    run(chat.send("one"))
    before = (chat.messages, chat.transcript)
    with pytest.raises(ChatError, match=fragment):
        chat.edit(index, text)
    assert (chat.messages, chat.transcript) == before


def test_sessions_draw_their_own_seeds_and_a_seed_replays(tokenizer):
    model = tiny_model(lckv_map(4), vocab_size=len(tokenizer))
    sampled = SamplingSettings(temperature=0.7, max_new_tokens=24)

    def reply(chat) -> str:
        return run(chat.send("Tell me a story."))[-1].reply

    def new(seed=None) -> ChatSession:
        return ChatSession(model, tokenizer, sampling=sampled, seed=seed)

    assert reply(new()) != reply(new())
    fixed = reply(new(7))
    assert reply(new(7)) == fixed
    later = new()
    assert "seed 7" in later.configure(seed=7) and later.seed == 7
    assert reply(later) == fixed
    later.clear()  # a new conversation with the seed set starts its stream again
    assert reply(later) == fixed
    assert "fresh random seed" in later.configure(seed=None) and later.stats().seed is None
    with pytest.raises(ValueError, match="seed must be"):
        later.configure(seed=-1)


def test_clear_starts_new_metrics(tokenizer):
    chat = session(tokenizer)
    run(chat.send("one"))
    assert chat.metrics.last_turn is not None and chat.metrics.tokens_generated > 0
    chat.clear()
    assert chat.metrics.last_turn is None and chat.metrics.tokens_generated == 0 and not chat.metrics.token_ms
    assert chat.stats().turns == 0


def test_a_view_of_a_long_conversation_costs_what_it_shows(tokenizer):
    chat = session(tokenizer, sampling=SamplingSettings(temperature=0, max_new_tokens=1))
    for turn in range(30):
        run(chat.send(f"turn {turn}"))
    assert chat.message_count == 60 and chat.stats().turns == 30
    assert chat.message_slice(56) == chat.messages[56:] and chat.message_slice(2, 4) == chat.messages[2:4]
    chat.message_slice(0, 1)[0]["content"] = "changed"  # a copy
    assert chat.messages[0]["content"] == "turn 0"
    chat.undo()
    assert chat.stats().turns == 29 and chat.message_count == 58


def test_stats_say_when_the_pinned_start_raises_the_sink(tokenizer):
    chat = session(tokenizer, sink=2, system_prompt="You are a helpful assistant.")
    stats = chat.stats()
    assert stats.sink_setting == 2 and stats.pinned_tokens == stats.cache.sink > 2


def test_close_gives_the_cache_and_the_snapshots_back(tokenizer):
    chat = session(tokenizer)
    run(chat.send("one"))
    chat.close()
    assert chat.engine.stats().rows_on_device == 0 and chat.engine.stats().rows_on_host == 0
    assert chat._undo_point is None and chat._regen_point is None
    assert run(chat.send("two"))[-1].reason in ("eos", "max_new_tokens")  # rebuilt from the transcript
    assert chat.stats().cache.tokens_seen == len(chat.transcript)
