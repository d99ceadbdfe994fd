"""app_support.sessions: one ChatSession per browser session, idle eviction, freeing, generation slots."""

from __future__ import annotations

import gc
import time
import weakref

import pytest

from app_support.sessions import GenerationSlots, SessionRegistry
from app_support.tiny import tiny_random_model
from lckv_stream.chat import CacheSettings, ChatSession, TokenEvent
from lckv_stream.sampling import SamplingSettings


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_random_model()


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def registry(model_and_tokenizer, clock):
    model, tokenizer = model_and_tokenizer
    factory = lambda: ChatSession(model, tokenizer, cache_settings=CacheSettings(4, 32))  # noqa: E731
    return SessionRegistry(factory, idle_seconds=60, clock=clock)


def test_each_key_gets_its_own_session_once(registry):
    first, created = registry.get("a")
    again, created_again = registry.get("a")
    other, _ = registry.get("b")
    assert created and not created_again and first is again and other is not first and len(registry) == 2


def test_idle_sessions_are_evicted_and_their_memory_freed(registry, clock):
    session, _ = registry.get("idle")
    list(session.send("hello", SamplingSettings(max_new_tokens=3)))
    gone = weakref.ref(session)  # the registry holds the only reference, so eviction frees the cache
    del session
    registry.get("busy-user")
    clock.now = 59
    registry.get("busy-user")
    clock.now = 61
    assert registry.evict_idle() == ["idle"]
    gc.collect()
    assert gone() is None and registry.peek("idle") is None and registry.peek("busy-user") is not None
    session, created = registry.get("idle")
    assert created and session.messages == []


def test_a_generating_session_is_not_evicted(registry, clock):
    session, _ = registry.get("streaming")
    events = session.send("hello", SamplingSettings(temperature=0, max_new_tokens=50))
    assert isinstance(next(e for e in events if isinstance(e, TokenEvent)), TokenEvent)
    clock.now = 1000
    assert registry.evict_idle() == []
    events.close()
    assert registry.evict_idle() == ["streaming"]


def test_drop_stops_a_streaming_reply_and_frees_the_session(registry):
    session, _ = registry.get("tab")
    gone = weakref.ref(session)
    events = session.send("hello", SamplingSettings(temperature=0, max_new_tokens=50))
    next(e for e in events if isinstance(e, TokenEvent))
    assert registry.drop("tab") and not registry.drop("tab")
    assert list(events)[-1].reason == "stopped"
    del session, events
    gc.collect()
    assert gone() is None and len(registry) == 0


def test_stop_sets_the_halt_flag_of_that_session_only(registry):
    registry.get("a")
    registry.get("b")
    assert registry.stop("a") and not registry.stop("missing")
    assert registry.halt_event("a").is_set() and not registry.halt_event("b").is_set()


def test_generation_slots_count_and_release():
    slots = GenerationSlots(2)
    with slots.hold():
        assert not slots.full()
        with slots.hold():
            assert slots.full() and slots.active == 2
    assert slots.active == 0
    with pytest.raises(RuntimeError):
        with slots.hold():
            raise RuntimeError("a failing reply still frees its slot")
    assert slots.active == 0
    with pytest.raises(ValueError):
        GenerationSlots(0)


def test_closed_tabs_memory_is_handed_back_once_soon_after(registry, monkeypatch):
    """Many tabs closed together: one hand-back (a full collection holds the interpreter) on a timer,
    not one per tab in the requests."""
    import app_support.sessions as sessions

    calls = []
    monkeypatch.setattr(sessions, "RELEASE_AFTER_S", 0.2)
    monkeypatch.setattr(sessions, "release_freed_memory", lambda: calls.append(1) or True)
    for key in ("a", "b", "c"):
        registry.get(key)
    assert all(registry.drop(key) for key in ("a", "b", "c"))
    assert registry.release_pending and calls == []
    deadline = time.monotonic() + 10
    while registry.release_pending and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not registry.release_pending and calls == [1]
