"""`ConversationStore`: conversations kept in one SQLite file, so a reload, a restart or a crash loses nothing.

How the app and `ChatSession` use it (each call is one transaction, committed before it returns):
- A new conversation: `create(owner, settings, system_prompt) -> id`. `owner` is the browser's random
  key; every other call takes `(id, owner)` and raises ConversationNotFound when that owner does not
  own the id, exactly as when the id does not exist.
- A user message, as soon as its tokens are known (the turn's `ids`, before they are encoded):
  `append_message(id, owner, "user", text, ids, segment_text=delta)`.
- A reply: `writer = begin_reply(id, owner)` before the first token; `writer.add(token_id, piece)` at
  each TokenEvent (it rewrites the partial reply, text and tokens, every `flush_tokens` tokens or
  `flush_seconds`, whichever comes first: one small UPDATE); `writer.finish(status_for_reason(reason),
  reply)` at TurnEnd. A reply's segment text is `decode(tokens)` by definition, so it is left None.
  A reply still STREAMING when a store is opened was cut by the end of the process that wrote it:
  opening marks it CUT, with whatever had been flushed.
- Undo, regenerate, clear, "stopped while reading": `truncate(id, owner, keep_messages)` with the number
  of messages the session kept. A settings change: `configure(id, owner, settings=...)`; a system
  prompt change re-templates the first message, so: `configure(id, owner, system_prompt=...,
  first_segment=(ids, text))`, one transaction.
- Resume: `load(id, owner)` gives the messages and each one's token segment. The session takes them as
  its messages, segments and segment texts (None: `decode(tokens)`), marks its cache stale, and the
  next turn rebuilds the cache from the transcript as after a settings change (pinned prefix + latest
  tokens). A CUT reply is then like a stopped one: its tokens stay in the transcript, its content
  becomes `decode_visible(tokens)` (what a stopped reply's is; the streamed pieces may hold back a
  partial character), and the next user turn's template text closes it. Undo and regenerate right after a resume re-encode, as after
  a settings change (their snapshots are not stored).
- Resume without re-encoding: after a turn, `put_cache_rows(id, owner, cache.snapshot(),
  len(transcript), fingerprint)` (fingerprint: the model and the cache shape); on resume
  `get_cache_rows` gives the rows back to `cache.restore` when the fingerprint matches, and only the
  transcript past `transcript_length` is encoded. Rows are dropped when a message they hold changes
  (truncation, a re-templated first message) or the cache settings change.
- The browser's list: `list(owner)`, `rename`, `delete`; files: `export_json`, `import_json` and
  `import_file` (conversation_file.py: schema and validation; nothing is written when it fails).
- Where: `open_store()` reads LCKV_STORE (off: None, no store) and LCKV_DATA_DIR (see
  `default_data_dir`). One process writes a store file at a time (the app).

Durability: WAL with synchronous=NORMAL. A commit is in the WAL (in the OS's page cache) when it
returns, so it survives the process being killed (SIGKILL, OOM, a crash); a power loss or an OS
crash can lose the transactions since the last checkpoint, never the file's consistency.
`synchronous="FULL"` also survives a power loss, at one fsync per commit.

Nothing read from the store is ever unpickled or executed: text, numbers, JSON settings validated on
load, token ids as packed integers, cache rows as safetensors.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import sqlite3
import sys
import threading
import time
from array import array
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

from . import conversation_file
from .conversation import (
    COMPLETE,
    CUT,
    FINAL_STATUSES,
    STREAMING,
    Conversation,
    ConversationSettings,
    Message,
    clean_title,
    title_from_message,
)

DB_NAME = "conversations.sqlite3"
SCHEMA_VERSION = 1
ID_BYTES = 16  # 128 random bits
_ID = re.compile(r"^[A-Za-z0-9_-]{16,64}$")
MAX_OWNER = 512
_UNCHANGED = object()

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS conversations (
        row INTEGER PRIMARY KEY,        -- what messages refer to: a few bytes, where the id takes 22
        id TEXT NOT NULL UNIQUE,
        owner BLOB NOT NULL,            -- sha256 of the owner key: the file never holds the key itself
        title TEXT NOT NULL,
        auto_title INTEGER NOT NULL,    -- 1 until renamed: the first user message names it
        created REAL NOT NULL,
        updated REAL NOT NULL,
        system_prompt TEXT,
        settings TEXT NOT NULL          -- ConversationSettings.to_dict() as JSON
    )""",
    "CREATE INDEX IF NOT EXISTS conversations_by_owner ON conversations (owner, updated)",
    """CREATE TABLE IF NOT EXISTS messages (
        conversation INTEGER NOT NULL REFERENCES conversations (row) ON DELETE CASCADE,
        position INTEGER NOT NULL,      -- 0, 1, ... in order: truncation deletes a tail
        role TEXT NOT NULL,
        status TEXT NOT NULL,
        n_tokens INTEGER NOT NULL,
        created REAL NOT NULL,
        content TEXT NOT NULL,
        segment_text TEXT,
        tokens BLOB NOT NULL,           -- token ids, see _pack; small columns come first
        PRIMARY KEY (conversation, position)
    )""",
    # Opening a store looks only at replies left streaming, however large the file.
    "CREATE INDEX IF NOT EXISTS messages_streaming ON messages (conversation) WHERE status = 'streaming'",
    """CREATE TABLE IF NOT EXISTS cache_rows (
        conversation INTEGER PRIMARY KEY REFERENCES conversations (row) ON DELETE CASCADE,
        messages INTEGER NOT NULL,      -- the first `messages` messages' tokens are in these rows
        transcript_length INTEGER NOT NULL,
        fingerprint TEXT NOT NULL,
        data BLOB NOT NULL              -- safetensors
    )""",
)


class StoreError(RuntimeError):
    """The store cannot do what was asked (a newer file, a reply that is not streaming, ...)."""


class ConversationNotFound(LookupError):
    """No conversation with this id for this owner (also when another owner has it)."""

    def __init__(self) -> None:
        super().__init__("no such conversation")


@dataclass(frozen=True)
class ConversationSummary:
    """One line of a browser's list of conversations."""

    id: str
    title: str
    created: float
    updated: float
    messages: int


@dataclass(frozen=True)
class CacheRows:
    """Cache buffers saved after `messages` messages (`transcript_length` tokens)."""

    tensors: dict
    messages: int
    transcript_length: int
    fingerprint: str


class ConversationStore:
    """Conversations of many owners in one SQLite file; safe to share between threads."""

    def __init__(self, path: str | os.PathLike, synchronous: str = "NORMAL", clock: Callable[[], float] = time.time) -> None:
        if synchronous.upper() not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be NORMAL or FULL, got {synchronous!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._clock = clock
        # One connection behind a lock: SQLite has one writer at a time anyway, and every
        # transaction here is short; the lock keeps two threads' transactions from interleaving.
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=30)
        try:
            self.journal_mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            self._db.execute(f"PRAGMA synchronous={synchronous.upper()}")
            self._db.execute("PRAGMA foreign_keys=ON")
            with self._write() as db:
                version = db.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.path} was written by a newer lckv-stream (schema {version}; this one reads {SCHEMA_VERSION})"
                    )
                for statement in _SCHEMA:
                    db.execute(statement)
                db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                self.recovered = db.execute(
                    "UPDATE messages SET status = ? WHERE status = ?", (CUT, STREAMING)
                ).rowcount
        except BaseException:
            self._db.close()
            raise

    # ---- lifetime -----------------------------------------------------------------------------
    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> ConversationStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def checkpoint(self) -> None:
        """Copy the WAL into the main file and empty it (sizes are then the file's alone)."""
        with self._lock:
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def file_bytes(self) -> int:
        """Bytes on disk: the database file and its WAL."""
        wal = self.path.with_name(self.path.name + "-wal")
        return sum(p.stat().st_size for p in (self.path, wal) if p.exists())

    # ---- conversations ------------------------------------------------------------------------
    def create(
        self,
        owner: str,
        settings: ConversationSettings = ConversationSettings(),
        system_prompt: str | None = None,
        title: str | None = None,
    ) -> str:
        """A new empty conversation of `owner`; returns its id (128 random bits)."""
        key = _owner_key(owner)
        _check_prompt(system_prompt)
        now = self._clock()
        conversation_id = secrets.token_hex(ID_BYTES)  # hex: an id never starts with "-", which a command line would take for a flag
        with self._write() as db:
            db.execute(
                "INSERT INTO conversations VALUES (NULL, ?, ?, ?, ?, ?, ?, ?, ?)",
                (conversation_id, key, clean_title(title) if title else "New conversation", not title,
                 now, now, system_prompt, json.dumps(settings.to_dict())),
            )
        return conversation_id

    def list(self, owner: str) -> list[ConversationSummary]:
        """`owner`'s conversations, the most recently active first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, title, created, updated,"
                " (SELECT COUNT(*) FROM messages WHERE conversation = row)"
                " FROM conversations WHERE owner = ? ORDER BY updated DESC, created DESC",
                (_owner_key(owner),),
            ).fetchall()
        return [ConversationSummary(*row) for row in rows]

    def rename(self, conversation_id: str, owner: str, title: str) -> None:
        title = clean_title(title)
        with self._write() as db:
            row = self._row(db, conversation_id, owner)
            db.execute("UPDATE conversations SET title = ?, auto_title = 0 WHERE row = ?", (title, row))

    def delete(self, conversation_id: str, owner: str) -> None:
        """Remove the conversation, its messages and its cache rows."""
        with self._write() as db:
            row = self._row(db, conversation_id, owner)
            db.execute("DELETE FROM conversations WHERE row = ?", (row,))

    def load(self, conversation_id: str, owner: str) -> Conversation:
        """The whole conversation: settings, system prompt, messages with their token segments."""
        with self._read() as db:
            row = self._row(db, conversation_id, owner)
            title, created, updated, prompt, settings = db.execute(
                "SELECT title, created, updated, system_prompt, settings FROM conversations WHERE row = ?", (row,)
            ).fetchone()
            rows = db.execute(
                "SELECT role, content, tokens, status, segment_text, created FROM messages"
                " WHERE conversation = ? ORDER BY position",
                (row,),
            ).fetchall()
        messages = tuple(
            Message(role, content, _unpack(blob), status, segment_text, stamp)
            for role, content, blob, status, segment_text, stamp in rows
        )
        return Conversation(
            conversation_id, title, created, updated, prompt,
            ConversationSettings.from_dict(json.loads(settings)), messages,
        )

    def configure(
        self,
        conversation_id: str,
        owner: str,
        settings: ConversationSettings | None = None,
        system_prompt: str | None | object = _UNCHANGED,
        first_segment: tuple[Sequence[int], str | None] | None = None,
    ) -> None:
        """Store new settings and/or system prompt; `first_segment` (tokens, text) replaces the first
        message's segment in the same transaction (the session re-templates it with the new prompt)."""
        if system_prompt is not _UNCHANGED:
            _check_prompt(system_prompt)
        packed = None if first_segment is None else (_pack(first_segment[0]), len(first_segment[0]), first_segment[1])
        with self._write() as db:
            row = self._row(db, conversation_id, owner)
            if settings is not None:
                old = db.execute("SELECT settings FROM conversations WHERE row = ?", (row,)).fetchone()[0]
                if ConversationSettings.from_dict(json.loads(old)).cache != settings.cache:
                    db.execute("DELETE FROM cache_rows WHERE conversation = ?", (row,))  # another cache shape
                db.execute("UPDATE conversations SET settings = ? WHERE row = ?", (json.dumps(settings.to_dict()), row))
            if system_prompt is not _UNCHANGED:
                db.execute("UPDATE conversations SET system_prompt = ? WHERE row = ?", (system_prompt, row))
            if packed is not None:
                changed = db.execute(
                    "UPDATE messages SET tokens = ?, n_tokens = ?, segment_text = ? WHERE conversation = ? AND position = 0",
                    (*packed, row),
                ).rowcount
                if not changed:
                    raise StoreError("first_segment given, but the conversation has no messages")
                self._drop_cache_rows_from(db, row, 0)
            self._touch(db, row)

    # ---- messages -----------------------------------------------------------------------------
    def append_message(
        self,
        conversation_id: str,
        owner: str,
        role: str,
        content: str,
        tokens: Sequence[int],
        status: str = COMPLETE,
        segment_text: str | None = None,
    ) -> int:
        """Commit a whole message at the end of the conversation; returns its position."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"append_message stores a finished message, not {status!r}: use begin_reply to stream")
        return self._insert_message(conversation_id, owner, Message(role, content, tokens, status, segment_text))

    def begin_reply(
        self,
        conversation_id: str,
        owner: str,
        role: str = "assistant",
        flush_tokens: int = 32,
        flush_seconds: float = 0.5,
    ) -> ReplyWriter:
        """Start a streamed reply: an empty STREAMING message the writer fills as tokens arrive."""
        position = self._insert_message(conversation_id, owner, Message(role, "", (), STREAMING))
        return ReplyWriter(self, conversation_id, owner, position, flush_tokens, flush_seconds)

    def update_streaming(
        self,
        conversation_id: str,
        owner: str,
        position: int,
        content: str,
        tokens: Sequence[int],
        segment_text: str | None = None,
    ) -> None:
        """Overwrite a STREAMING reply's partial text and tokens (what a crash would keep)."""
        self._set_message(conversation_id, owner, position, content, tokens, segment_text, STREAMING)

    def finish_message(
        self,
        conversation_id: str,
        owner: str,
        position: int,
        content: str,
        tokens: Sequence[int],
        status: str = COMPLETE,
        segment_text: str | None = None,
    ) -> None:
        """The final text, tokens and status (COMPLETE, STOPPED or CUT) of a STREAMING reply."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"a finished message is {', '.join(FINAL_STATUSES)}, not {status!r}")
        self._set_message(conversation_id, owner, position, content, tokens, segment_text, status)

    def truncate(self, conversation_id: str, owner: str, keep_messages: int) -> None:
        """Keep the first `keep_messages` messages (undo, regenerate, clear)."""
        if keep_messages < 0:
            raise ValueError(f"keep_messages must be >= 0, got {keep_messages}")
        with self._write() as db:
            row = self._row(db, conversation_id, owner)
            db.execute("DELETE FROM messages WHERE conversation = ? AND position >= ?", (row, keep_messages))
            self._drop_cache_rows_from(db, row, keep_messages)
            self._touch(db, row)

    # ---- cache rows ---------------------------------------------------------------------------
    def put_cache_rows(
        self, conversation_id: str, owner: str, tensors: Mapping[str, object], transcript_length: int, fingerprint: str
    ) -> None:
        """Save cache buffers (a `SinkWindowCache.snapshot()`) holding the first `transcript_length`
        tokens; that must be where a message ends. `fingerprint` names the model and cache shape."""
        from safetensors.torch import save

        data = save({name: tensor.detach().contiguous().cpu() for name, tensor in tensors.items()})
        with self._write() as db:
            row = self._row(db, conversation_id, owner)
            total, messages = 0, 0
            for (n_tokens,) in db.execute("SELECT n_tokens FROM messages WHERE conversation = ? ORDER BY position", (row,)):
                if total >= transcript_length:
                    break
                total, messages = total + n_tokens, messages + 1
            if total != transcript_length:
                raise ValueError(f"no message ends at token {transcript_length} (the transcript has moved on)")
            db.execute(
                "INSERT OR REPLACE INTO cache_rows VALUES (?, ?, ?, ?, ?)",
                (row, messages, transcript_length, fingerprint, data),
            )

    def get_cache_rows(self, conversation_id: str, owner: str) -> CacheRows | None:
        """The saved cache buffers, or None when there are none (or the transcript they held changed)."""
        from safetensors.torch import load

        with self._read() as db:
            row = self._row(db, conversation_id, owner)
            saved = db.execute(
                "SELECT messages, transcript_length, fingerprint, data FROM cache_rows WHERE conversation = ?", (row,)
            ).fetchone()
        if saved is None:
            return None
        messages, length, fingerprint, data = saved
        return CacheRows(load(data), messages, length, fingerprint)

    # ---- files --------------------------------------------------------------------------------
    def export_json(self, conversation_id: str, owner: str) -> str:
        """The conversation as a conversation file (see conversation_file.py)."""
        return conversation_file.dumps(self.load(conversation_id, owner))

    def import_json(self, text: str | bytes, owner: str, vocab_size: int) -> str:
        """A new conversation of `owner` from a conversation file; ConversationFileError (nothing
        written) when the file is not acceptable."""
        return self.insert(conversation_file.loads(text, vocab_size), owner)

    def import_file(self, path: str | os.PathLike, owner: str, vocab_size: int) -> str:
        """`import_json` of a file, refused by its size before it is read whole."""
        return self.insert(conversation_file.load_path(path, vocab_size), owner)

    def insert(self, conversation: Conversation, owner: str) -> str:
        """Store a whole conversation under a new id (its own id is ignored), in one transaction."""
        key = _owner_key(owner)
        _check_prompt(conversation.system_prompt)
        conversation_id = secrets.token_hex(ID_BYTES)  # hex: an id never starts with "-", which a command line would take for a flag
        now = self._clock()
        rows = [
            (position, m.role, CUT if m.status == STREAMING else m.status, len(m.tokens),
             m.created or now, m.content, m.segment_text, _pack(m.tokens))
            for position, m in enumerate(conversation.messages)
        ]
        with self._write() as db:
            row = db.execute(
                "INSERT INTO conversations VALUES (NULL, ?, ?, ?, 0, ?, ?, ?, ?)",
                (conversation_id, key, clean_title(conversation.title or "Imported conversation"),
                 conversation.created or now, conversation.updated or now, conversation.system_prompt,
                 json.dumps(conversation.settings.to_dict())),
            ).lastrowid
            db.executemany("INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", [(row, *r) for r in rows])
        return conversation_id

    # ---- internals ----------------------------------------------------------------------------
    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction; IMMEDIATE takes the write lock up front (no upgrade deadlock)."""
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    @contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        """One read transaction: its SELECTs see one state of the file."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                yield self._db
            finally:
                self._db.execute("COMMIT")

    @staticmethod
    def _row(db: sqlite3.Connection, conversation_id: str, owner: str) -> int:
        """The conversation's row, when `owner` owns it; else ConversationNotFound, the same for an
        id that exists under another owner as for one that does not exist."""
        key = _owner_key(owner)
        if not isinstance(conversation_id, str) or not _ID.match(conversation_id):
            raise ConversationNotFound()
        found = db.execute("SELECT row FROM conversations WHERE id = ? AND owner = ?", (conversation_id, key)).fetchone()
        if found is None:
            raise ConversationNotFound()
        return found[0]

    def _touch(self, db: sqlite3.Connection, row: int) -> None:
        db.execute("UPDATE conversations SET updated = ? WHERE row = ?", (self._clock(), row))

    @staticmethod
    def _drop_cache_rows_from(db: sqlite3.Connection, row: int, position: int) -> None:
        """Cache rows that hold message `position` no longer match the transcript."""
        db.execute("DELETE FROM cache_rows WHERE conversation = ? AND messages > ?", (row, position))

    def _insert_message(self, conversation_id: str, owner: str, message: Message) -> int:
        blob = _pack(message.tokens)
        now = self._clock()
        with self._write() as db:
            row = self._row(db, conversation_id, owner)
            position = db.execute(
                "SELECT COALESCE(MAX(position) + 1, 0) FROM messages WHERE conversation = ?", (row,)
            ).fetchone()[0]
            db.execute(
                "INSERT INTO messages VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (row, position, message.role, message.status, len(message.tokens), now,
                 message.content, message.segment_text, blob),
            )
            if message.role == "user":
                db.execute(
                    "UPDATE conversations SET title = ?, auto_title = 0 WHERE row = ? AND auto_title = 1",
                    (title_from_message(message.content), row),
                )
            self._touch(db, row)
        return position

    def _set_message(
        self, conversation_id: str, owner: str, position: int, content: str, tokens: Sequence[int],
        segment_text: str | None, status: str,
    ) -> None:
        if not isinstance(content, str) or not (segment_text is None or isinstance(segment_text, str)):
            raise ValueError("a reply's content must be text, its segment_text text or None")
        blob = _pack(tokens)
        with self._write() as db:
            row = self._row(db, conversation_id, owner)
            changed = db.execute(
                "UPDATE messages SET content = ?, tokens = ?, n_tokens = ?, segment_text = ?, status = ?"
                " WHERE conversation = ? AND position = ? AND status = ?",
                (content, blob, len(tokens), segment_text, status, row, position, STREAMING),
            ).rowcount
            if not changed:
                raise StoreError(f"message {position} of this conversation is not a streaming reply")
            self._drop_cache_rows_from(db, row, position)
            if status != STREAMING:
                self._touch(db, row)


class ReplyWriter:
    """Writes a streamed reply into the store as it grows, cheaply, and its end.

    `add` keeps the tokens in memory and rewrites the stored partial reply every `flush_tokens`
    tokens or `flush_seconds`, whichever comes first, so a crash loses at most that much of it.
    """

    def __init__(
        self, store: ConversationStore, conversation_id: str, owner: str, position: int,
        flush_tokens: int, flush_seconds: float,
    ) -> None:
        if flush_tokens < 1 or flush_seconds < 0:
            raise ValueError("flush_tokens must be >= 1 and flush_seconds >= 0")
        self.store = store
        self.conversation_id = conversation_id
        self.owner = owner
        self.position = position
        self.flush_tokens = flush_tokens
        self.flush_seconds = flush_seconds
        self.tokens: list[int] = []
        self.content = ""
        self.finished = False
        self._flushed = 0  # tokens written so far
        self._flushed_at = time.monotonic()

    def add(self, token_id: int, text: str = "") -> None:
        """One streamed token and the visible text it completes."""
        self.tokens.append(int(token_id))
        self.content += text
        if (
            len(self.tokens) - self._flushed >= self.flush_tokens
            or time.monotonic() - self._flushed_at >= self.flush_seconds
        ):
            self.flush()

    def flush(self) -> None:
        """Write the partial reply now."""
        self.store.update_streaming(self.conversation_id, self.owner, self.position, self.content, self.tokens)
        self._flushed = len(self.tokens)
        self._flushed_at = time.monotonic()

    def finish(self, status: str = COMPLETE, content: str | None = None, segment_text: str | None = None) -> None:
        """The reply's end: its status, final text (default: the pieces added) and segment text."""
        if content is not None:
            self.content = content
        self.store.finish_message(
            self.conversation_id, self.owner, self.position, self.content, self.tokens, status, segment_text
        )
        self.finished = True


# ---- where the store lives ----------------------------------------------------------------------
def default_data_dir(environ: Mapping[str, str] = os.environ, spaces_dir: Path = Path("/data")) -> Path:
    """LCKV_DATA_DIR; else /data/lckv-stream when /data is writable (a Hugging Face Space with
    persistent storage); else the user's data directory ($XDG_DATA_HOME or ~/.local/share)."""
    if environ.get("LCKV_DATA_DIR"):
        return Path(environ["LCKV_DATA_DIR"]).expanduser()
    if spaces_dir.is_dir() and os.access(spaces_dir, os.W_OK | os.X_OK):
        return spaces_dir / "lckv-stream"
    if environ.get("XDG_DATA_HOME"):
        return Path(environ["XDG_DATA_HOME"]) / "lckv-stream"
    if sys.platform == "win32" and environ.get("LOCALAPPDATA"):
        return Path(environ["LOCALAPPDATA"]) / "lckv-stream"
    return Path.home() / ".local" / "share" / "lckv-stream"


def store_enabled(environ: Mapping[str, str] = os.environ) -> bool:
    """False when LCKV_STORE is off (also 0, false, no); ValueError on a value it does not know."""
    value = environ.get("LCKV_STORE", "on").strip().lower()
    if value in ("off", "0", "false", "no"):
        return False
    if value in ("on", "1", "true", "yes", ""):
        return True
    raise ValueError(f"LCKV_STORE must be on or off, got {environ['LCKV_STORE']!r}")


def open_store(environ: Mapping[str, str] = os.environ, spaces_dir: Path = Path("/data")) -> ConversationStore | None:
    """The store the environment asks for, or None with LCKV_STORE=off."""
    if not store_enabled(environ):
        return None
    return ConversationStore(default_data_dir(environ, spaces_dir) / DB_NAME)


# ---- encodings ----------------------------------------------------------------------------------
def _owner_key(owner: str) -> bytes:
    if not isinstance(owner, str) or not owner or len(owner) > MAX_OWNER:
        raise ValueError(f"an owner key must be text of 1 to {MAX_OWNER} characters")
    return hashlib.sha256(owner.encode()).digest()


def _check_prompt(system_prompt: object) -> None:
    if system_prompt is not None and not isinstance(system_prompt, str):
        raise ValueError(f"a system prompt must be text or None, got {type(system_prompt).__name__}")


def _pack(tokens: Sequence[int]) -> bytes:
    """Token ids as one width byte (2 or 4) and little-endian integers of that width: 2 bytes a
    token for vocabularies under 65,536 (SmolLM2's 49,152), 4 above."""
    try:
        packed = array("H", tokens)
    except OverflowError:
        packed = None
    except TypeError as error:
        raise ValueError(f"token ids must be whole numbers: {error}") from None
    if packed is None:
        try:
            packed = array("I", tokens)
        except OverflowError:
            raise ValueError("token ids must be whole numbers from 0 to 2**32 - 1") from None
    if sys.byteorder == "big":
        packed.byteswap()
    return bytes((packed.itemsize,)) + packed.tobytes()


def _unpack(blob: bytes) -> tuple[int, ...]:
    tokens = array({2: "H", 4: "I"}[blob[0]])
    tokens.frombytes(blob[1:])
    if sys.byteorder == "big":
        tokens.byteswap()
    return tuple(tokens)


assert (array("H").itemsize, array("I").itemsize) == (2, 4), "token ids are stored as 2- or 4-byte integers"
