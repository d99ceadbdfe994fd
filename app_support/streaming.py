"""Run a turn's engine events in their own thread and hand them to the UI in batches.

The engine times each token from the previous one, so a consumer that takes a while between tokens
(Gradio serializes and sends every update) would be counted in the model's per-token latency. Here
the engine never waits for the UI: a thread iterates it into a queue, and the UI takes whatever has
arrived since its last update, as one batch. The threads come from a fixed pool: a new thread per
turn would leave a new malloc arena behind now and then, and the process would grow.
"""

from __future__ import annotations

import queue
from concurrent.futures import Executor
from typing import Iterator

_DONE = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class EventPump:
    """Iterates `events` on one of `workers`' threads; `batches()` yields what arrived since the last batch."""

    def __init__(self, events: Iterator, workers: Executor) -> None:
        self._queue: queue.Queue = queue.Queue()
        self._done = workers.submit(self._run, events)

    def _run(self, events: Iterator) -> None:
        try:
            for event in events:
                self._queue.put(event)
        except BaseException as error:  # handed to the consumer, which re-raises it in its own thread
            self._queue.put(_Failure(error))
        finally:
            self._queue.put(_DONE)

    @property
    def running(self) -> bool:
        return not self._done.done()

    def batches(self) -> Iterator[list]:
        """Lists of events in order, blocking until at least one is there; raises what the engine raised."""
        while True:
            items = [self._queue.get()]
            while True:
                try:
                    items.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            events = []
            for item in items:
                if isinstance(item, _Failure):
                    raise item.error
                if item is _DONE:
                    if events:
                        yield events
                    return
                events.append(item)
            yield events
