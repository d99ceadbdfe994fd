"""One ChatSession per browser session, evicted when idle, and a count of replies being generated.

The registry is keyed by Gradio's session hash, so two tabs (or two API clients) never share a
cache or a transcript. Dropping an entry is what frees its memory: the session's cache buffers are
only referenced from here, and closing it hands its host memory back to the system.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator, Union

from app_support.chat_view import ChatWindow
from lckv_stream.chat import ChatSession
from lckv_stream.memory import release_freed_memory

EVICTED_REMEMBERED = 4096  # keys of evicted sessions kept, to tell their page why its chat restarted


@dataclass(frozen=True)
class Message:
    """A message Send accepted, waiting for its reply."""

    ticket: int
    text: str


@dataclass(frozen=True)
class Edit:
    """An edit of user message `index` (of the whole conversation), waiting for its reply."""

    ticket: int
    index: int
    text: str


@dataclass(frozen=True)
class Refused:
    """What Send said when it refused a message: the reply step after it says it again."""

    ticket: int
    note: str


Pending = Union[Message, Edit, Refused]


@dataclass
class PageState:
    """What one session's page shows and has asked for, beside its conversation."""

    window: ChatWindow = field(default_factory=ChatWindow)
    pending: Pending | None = None  # taken once by the reply step with its ticket: a second reply is refused
    # Set by Stop; long multi-turn runs check it between turns (the engine's own stop covers one turn).
    halt: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Entry:
    session: ChatSession
    last_used: float
    page: PageState = field(default_factory=PageState)


RELEASE_AFTER_S = 1.0  # closed sessions' memory goes back to the system this long after the first closes


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
        self._evicted: OrderedDict[str, bool] = OrderedDict()
        self._release_timer: threading.Timer | None = None  # hands closed sessions' memory back
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

    def page(self, key: str) -> PageState:
        """The page state of `key`'s session (created with the session)."""
        self.get(key)
        return self._entries[key].page

    def was_evicted(self, key: str) -> bool:
        """Whether `key`'s previous session was closed for being idle (said once)."""
        with self._lock:
            return self._evicted.pop(key, False)

    def peek(self, key: str) -> ChatSession | None:
        """The session for `key` if there is one; does not create it or count as use."""
        entry = self._entries.get(key)
        return entry.session if entry else None

    def halt_event(self, key: str) -> threading.Event:
        """The Stop flag of `key`'s session (created with the session)."""
        return self.page(key).halt

    def stop(self, key: str) -> bool:
        """Stop the reply (and any multi-turn run) of `key`; False when it has no session."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        entry.page.halt.set()
        entry.session.stop()
        return True

    def drop(self, key: str) -> bool:
        """Forget `key`'s session and free its memory (a closed tab); a streaming reply is stopped first."""
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is not None:
                self._schedule_release()  # pending from now on; runs after this close is done
        if entry is None:
            return False
        entry.page.halt.set()
        entry.session.stop()
        entry.session.close()
        del entry
        return True

    @property
    def release_pending(self) -> bool:
        """Whether closed sessions' memory is still to be handed back (`RELEASE_AFTER_S`)."""
        return self._release_timer is not None

    def _schedule_release(self) -> None:
        """(With the lock held.) Once for all the tabs closed within RELEASE_AFTER_S, off the request's
        thread: a full garbage collection holds the interpreter for about 0.1 s, which stalls the
        decoding between kernels."""
        if self._release_timer is not None:
            return
        self._release_timer = threading.Timer(RELEASE_AFTER_S, self._release_now)
        self._release_timer.daemon = True
        self._release_timer.start()

    def _release_now(self) -> None:
        try:
            release_freed_memory()
        finally:
            with self._lock:
                self._release_timer = None

    def evict_idle(self) -> list[str]:
        """Drop sessions unused for longer than idle_seconds (never one that is generating)."""
        now = self._clock()
        with self._lock:
            idle = [
                key for key, entry in self._entries.items()
                if now - entry.last_used > self.idle_seconds and not entry.session.generating
            ]
            evicted = [self._entries.pop(key) for key in idle]
            for key in idle:
                self._evicted[key] = True
            while len(self._evicted) > EVICTED_REMEMBERED:
                self._evicted.popitem(last=False)
        for entry in evicted:
            entry.session.close()
        del evicted
        if idle:
            release_freed_memory()
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


def forget_gradio_session(state_holder, key: str) -> None:
    """Drop Gradio's own state of a closed session.

    Gradio 6.31 keeps every session's copy of the page's component configs (about 100 KB, with the
    last chat and plot shown) until 10,000 newer sessions push it out, so a server that many users
    have visited keeps growing. The session's conversation is gone when its tab closes, so is this.
    """
    with state_holder.lock:
        state_holder.session_data.pop(key, None)
        state_holder.time_last_used.pop(key, None)

