"""One ChatSession per browser session, evicted when idle, and a count of replies being generated.

The registry is keyed by Gradio's session hash, so two tabs (or two API clients) never share a
cache or a transcript. Dropping an entry is what frees its memory: the session's cache buffers are
only referenced from here.
"""

from __future__ import annotations

import gc
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from lckv_stream.chat import ChatSession


@dataclass
class _Entry:
    session: ChatSession
    last_used: float
    # Set by Stop; long multi-turn runs check it between turns (the engine's own stop covers one turn).
    halt: threading.Event = field(default_factory=threading.Event)


class SessionRegistry:
    """Creates, finds and frees the ChatSession of each browser session."""

    def __init__(
        self,
        factory: Callable[[], ChatSession],
        idle_seconds: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._factory = factory
        self.idle_seconds = idle_seconds
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> tuple[ChatSession, bool]:
        """The session for `key` and whether it was just created (new, or the old one was evicted)."""
        with self._lock:
            entry = self._entries.get(key)
            created = entry is None
            if created:
                entry = self._entries[key] = _Entry(self._factory(), self._clock())
            entry.last_used = self._clock()
            return entry.session, created

    def peek(self, key: str) -> ChatSession | None:
        """The session for `key` if there is one; does not create it or count as use."""
        entry = self._entries.get(key)
        return entry.session if entry else None

    def halt_event(self, key: str) -> threading.Event:
        """The Stop flag of `key`'s session (created with the session)."""
        self.get(key)
        return self._entries[key].halt

    def stop(self, key: str) -> bool:
        """Stop the reply (and any multi-turn run) of `key`; False when it has no session."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        entry.halt.set()
        entry.session.stop()
        return True

    def drop(self, key: str) -> bool:
        """Forget `key`'s session and free its memory (a closed tab); a streaming reply is stopped first."""
        with self._lock:
            entry = self._entries.pop(key, None)
        if entry is None:
            return False
        entry.halt.set()
        entry.session.stop()
        entry.session.close()
        del entry
        _release_memory()
        return True

    def evict_idle(self) -> list[str]:
        """Drop sessions unused for longer than idle_seconds (never one that is generating)."""
        now = self._clock()
        with self._lock:
            idle = [
                key for key, entry in self._entries.items()
                if now - entry.last_used > self.idle_seconds and not entry.session.generating
            ]
            evicted = [self._entries.pop(key) for key in idle]
        for entry in evicted:
            entry.session.close()
        if idle:
            _release_memory()
        return idle

    def start_reaper(self, every_seconds: float) -> threading.Thread:
        """A daemon thread that evicts idle sessions every `every_seconds`."""

        def loop() -> None:
            while True:
                time.sleep(every_seconds)
                self.evict_idle()

        thread = threading.Thread(target=loop, name="lckv-session-reaper", daemon=True)
        thread.start()
        return thread


class GenerationSlots:
    """How many replies are being generated, against the cap Gradio's queue enforces.

    Gradio queues the events past the cap by itself; this count only lets the UI say so.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"the generation limit must be at least 1, got {limit}")
        self.limit = limit
        self._active = 0
        self._lock = threading.Lock()

    @property
    def active(self) -> int:
        return self._active

    def full(self) -> bool:
        return self._active >= self.limit

    @contextmanager
    def hold(self) -> Iterator[None]:
        with self._lock:
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1


def _release_memory() -> None:
    """Collect the dropped sessions now: their finalizers give their engine rows back."""
    gc.collect()

