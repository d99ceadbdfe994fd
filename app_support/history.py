"""Whose conversations a page may see, which one it has open, and the files it exports.

A browser is known by its owner key: 256 random bits made on its first visit and kept in the
browser's localStorage (gr.BrowserState) with the id of the conversation it has open. The key is
the browser's only proof of ownership; the store keeps a hash of it and checks it on every read
and write, so a page lists, opens and changes only its own conversations, and an id it did not
get from its own list reads as one that does not exist.

Gradio's session hash names one load of a page. Each page is bound to its owner and to at most one
stored conversation; a conversation is open in one page at a time: a page that opens it takes it
from any other (that page's next message starts a new conversation and says why), so two pages
never append to one transcript.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
import shutil
import tempfile
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from lckv_stream.store import ConversationSummary

OWNER_BYTES = 32
_OWNER = re.compile(r"^[A-Za-z0-9_-]{32,128}$")
SECRET_FILE = "browser-state.key"  # the key Gradio encrypts the browser's localStorage entry with
MAX_LISTED = 100  # conversations shown in the side list, the most recently active first
# Pages remembered at most: a page that never says it closed (a REST client is a new page at each
# call) would otherwise be kept for good; past this the least recently used are forgotten.
MAX_PAGES = 20_000
_UNSAFE = re.compile(r"[^A-Za-z0-9]+")


@dataclass
class Binding:
    """The owner of one page and the stored conversation it has open (None: not saved yet)."""

    owner: str
    conversation_id: str | None = None
    taken: bool = False  # another page opened this page's conversation: it continues there


def new_owner() -> str:
    return secrets.token_urlsafe(OWNER_BYTES)


def read_browser_value(value: object) -> tuple[str | None, str | None]:
    """(owner key, open conversation id) from what the browser kept; None for what is missing or
    malformed (a new key is then made: the value comes from the client and may be anything). An API
    client may pass back the update it got (`{"__type__": "update", "value": ...}`)."""
    if isinstance(value, dict) and value.get("__type__") == "update":
        value = value.get("value")
    if not isinstance(value, dict):
        return None, None
    owner, current = value.get("owner"), value.get("current")
    owner = owner if isinstance(owner, str) and _OWNER.match(owner) else None
    current = current if isinstance(current, str) and len(current) <= 64 else None
    return owner, current


def browser_value(binding: Binding) -> dict:
    """What the browser keeps: its owner key and the conversation it has open."""
    return {"owner": binding.owner, "current": binding.conversation_id}


def browser_secret(data_dir: Path) -> str:
    """The BrowserState encryption key, kept beside the store so that a browser's entry still reads
    after a restart (Gradio draws a new one per process by default). The page's config carries it
    to the browser, so it hides the entry from nothing but a casual look; the owner key is the secret."""
    path = Path(data_dir) / SECRET_FILE
    try:
        return path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        pass
    secret = secrets.token_urlsafe(32)
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_text(encoding="ascii").strip()
    with os.fdopen(descriptor, "w", encoding="ascii") as file:
        file.write(secret)
    return secret


def choices(conversations: list[ConversationSummary]) -> list[tuple[str, str]]:
    """The side list's (label, id) pairs: the latest MAX_LISTED conversations."""
    return [(summary.title, summary.id) for summary in conversations[:MAX_LISTED]]


class Pages:
    """Each page's binding, and which page holds each stored conversation."""

    def __init__(self, capacity: int = MAX_PAGES) -> None:
        self.capacity = capacity
        self._bindings: OrderedDict[str, Binding] = OrderedDict()  # least recently used first
        self._holders: dict[str, str] = {}  # conversation id -> page
        self._lock = threading.Lock()

    def bind(self, page: str, owner: str) -> Binding:
        """Bind `page` to `owner`, with no conversation open (the page's previous one is let go)."""
        with self._lock:
            self._let_go(page)
            binding = self._bindings[page] = Binding(owner)
            self._bindings.move_to_end(page)
            while len(self._bindings) > self.capacity:
                oldest = next(iter(self._bindings))
                self._let_go(oldest)
                del self._bindings[oldest]
            return binding

    def get(self, page: str) -> Binding | None:
        """`page`'s binding (None: it never opened, or was forgotten); counts as a use of it."""
        with self._lock:
            binding = self._bindings.get(page)
            if binding is not None:
                self._bindings.move_to_end(page)
            return binding

    def hold(self, page: str, conversation_id: str) -> str | None:
        """Make `conversation_id` `page`'s open conversation; returns the page that held it before
        (its binding is now without a conversation, marked taken), or None."""
        with self._lock:
            binding = self._bindings[page]
            if binding.conversation_id != conversation_id:
                self._let_go(page)
            previous = self._holders.get(conversation_id)
            self._holders[conversation_id] = page
            binding.conversation_id = conversation_id
            if previous is None or previous == page:
                return None
            other = self._bindings.get(previous)
            if other is not None and other.conversation_id == conversation_id:
                other.conversation_id, other.taken = None, True
            return previous

    def holder(self, conversation_id: str) -> str | None:
        return self._holders.get(conversation_id)

    def let_go(self, page: str) -> None:
        """`page` has no stored conversation open any more (a new one, or its conversation deleted)."""
        with self._lock:
            self._let_go(page)

    def forget(self, page: str) -> None:
        """The page was closed."""
        with self._lock:
            self._let_go(page)
            self._bindings.pop(page, None)

    def _let_go(self, page: str) -> None:
        binding = self._bindings.get(page)
        if binding is None or binding.conversation_id is None:
            return
        if self._holders.get(binding.conversation_id) == page:
            del self._holders[binding.conversation_id]
        binding.conversation_id = None


class Exports:
    """Export files, one folder per page, removed when the page closes (Gradio serves a copy of
    each from its own cache, which the app empties of files older than an hour)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="lckv-exports-"))
        weakref.finalize(self, shutil.rmtree, self.root, True)  # at exit at the latest

    def write(self, page: str, title: str, text: str) -> Path:
        """`text` as `<title>.json` in `page`'s folder (the page's earlier exports are replaced)."""
        folder = self._folder(page)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(mode=0o700)
        path = folder / f"{_UNSAFE.sub('-', title).strip('-')[:60].lower() or 'conversation'}.json"
        path.write_text(text, encoding="utf-8")
        return path

    def discard(self, page: str) -> None:
        shutil.rmtree(self._folder(page), ignore_errors=True)

    def _folder(self, page: str) -> Path:
        # The session hash comes from the client: hashed, it is always one safe folder name.
        return self.root / hashlib.sha256(page.encode()).hexdigest()[:32]
