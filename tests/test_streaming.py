"""app_support.streaming.EventPump: the engine runs ahead of a slow consumer; order and errors are kept."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from app_support.streaming import EventPump

WORKERS = ThreadPoolExecutor(2)


def test_batches_keep_every_event_in_order():
    pump = EventPump(iter(range(100)), WORKERS)
    received = []
    for batch in pump.batches():
        assert batch
        received.extend(batch)
        time.sleep(0.001)
    assert received == list(range(100))


def test_a_slow_consumer_does_not_hold_the_producer_back():
    """The engine's per-token clock runs while it is suspended: with the pump it never waits for the UI."""
    finished = threading.Event()
    waits = []

    def producer():
        for index in range(20):
            started = time.perf_counter()
            yield index
            waits.append(time.perf_counter() - started)
        finished.set()

    pump = EventPump(producer(), WORKERS)
    first = next(pump.batches())
    assert finished.wait(5) and max(waits) < 0.05  # done while the consumer still holds its first batch
    assert first[0] == 0


def test_the_producers_error_reaches_the_consumer():
    def failing():
        yield 1
        raise ValueError("busy")

    pump = EventPump(failing(), WORKERS)
    with pytest.raises(ValueError, match="busy"):
        for _ in pump.batches():
            pass
