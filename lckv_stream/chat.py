"""`ChatSession`: one conversation, a client of the device's `Engine`.

Each message owns the tokens it added to the transcript (a user message: the template text around
it; an assistant message: the sampled tokens). The cache (one engine row) always reflects the
transcript, so a new turn encodes only its own tokens, and whatever ends a stream, every token the
engine fed to the cache is in the transcript. Undo and regenerate restore a row snapshot taken at
the start of the last turn; when none fits (after a settings change) the cache is rebuilt from the
transcript. The engine decodes this conversation together with every other one on the device.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass
from typing import Iterator, Union

from .cache import CacheStats, validate_cache_size
from .chat_format import ChatError, ChatFormat, clean_message
from .limits import DEFAULTS, check
from .engine import Engine, EngineError, RowSnapshot
from .metrics import ConversationMetrics, TurnMetrics
from .sampling import SamplingSettings

MAX_WINDOW = 1 << 20
MAX_PINNED = 4096
_UNCHANGED = object()


@dataclass(frozen=True)
class CacheSettings:
    """Cache size: `sink` first tokens + `window` recent ones; the system prompt can be pinned."""

    sink: int = DEFAULTS["sink"]
    window: int = DEFAULTS["window"]
    pin_system_prompt: bool = True

    def __post_init__(self) -> None:
        validate_cache_size(self.sink, self.window)
        if self.window > MAX_WINDOW:
            raise ValueError(f"window must be at most {MAX_WINDOW}, got {self.window}")


@dataclass(frozen=True)
class PrefillProgress:
    """Encoding of a long message, chunk by chunk."""

    done: int
    total: int


@dataclass(frozen=True)
class TokenEvent:
    """One generated token: the new visible text it completes and how long it took."""

    text: str
    token_id: int
    latency_ms: float
    index: int


@dataclass(frozen=True)
class TurnEnd:
    """The end of a turn: the whole reply, why it ended, and its timings."""

    reply: str
    reason: str  # "eos", "max_new_tokens", "stopped", "stopped_while_reading"
    metrics: TurnMetrics


Event = Union[PrefillProgress, TokenEvent, TurnEnd]


@dataclass(frozen=True)
class SessionStats:
    """Cache occupancy next to the conversation it summarizes."""

    cache: CacheStats
    conversation_tokens: int
    dense_bytes: int  # a dense Llama cache of the same model holding the whole conversation
    decoder: str
    turns: int
    residence: str = "device"  # where the cache is: "device", "host" (idle), "none" (not made yet or dropped)
    rebuilt_from_transcript: bool = False  # the host budget dropped the cache once: it was re-encoded
    sink_setting: int = 0  # the sink asked for; cache.sink is larger when the pinned start needs more
    pinned_tokens: int = 0  # tokens of the pinned start: system prompt and chat template header
    seed: int | None = None  # the fixed seed of sampled replies; None: a random one per conversation


@dataclass
class _Checkpoint:
    snapshot: RowSnapshot
    messages: int
    epoch: int


class ChatSession:
    """One conversation: messages, their tokens, its engine row, sampling and timings."""

    def __init__(
        self,
        model,
        tokenizer,
        system_prompt: str | None = None,
        cache_settings: CacheSettings = CacheSettings(),
        sampling: SamplingSettings = SamplingSettings(),
        prefill_chunk: int = 256,
        seed: int | None = None,
        engine: Engine | None = None,
        recorder=None,
    ) -> None:
        """`seed` fixes the random stream of sampled replies (default: a fresh one per session);
        `engine` defaults to the model's shared engine; `recorder` (e.g. a `StoreRecorder`) is told
        of every change of the transcript."""
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        if seed is not None:
            check("seed", seed)
        self.model = model
        self.engine = engine or Engine.shared(model)
        self.format = ChatFormat(tokenizer)
        self.sampling = sampling
        self.prefill_chunk = prefill_chunk
        self.metrics = ConversationMetrics()
        self._seed = seed
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._system_prompt = self._check_system_prompt(system_prompt)
        self._cache_settings = cache_settings
        self._sink: int | None = None  # sink size in use: settings.sink or the pinned prefix, if longer
        self._pinned: tuple[str | None, int] | None = None  # (system prompt, tokens of the pinned start)
        self._messages: list[dict] = []
        self._segments: list[list[int]] = []  # tokens each message added, aligned with messages
        self._segment_texts: list[str] = []
        self._token_count = 0
        self._turns = 0  # user messages, counted as they come and go (read on every update)
        self._row = None
        self._stale = True  # the row does not reflect the transcript
        self._rebuilt_after_drop = False
        self._epoch = 0
        self._undo_point: _Checkpoint | None = None
        self._regen_point: _Checkpoint | None = None
        self.recorder = recorder

    # ---- saving and resuming ------------------------------------------------------------------
    def to_conversation(self, title: str = "Conversation"):
        """The conversation as it is stored and exported (`conversation.Conversation`)."""
        from .conversation import Conversation, ConversationSettings, Message

        now = time.time()
        messages = tuple(Message(m["role"], m["content"], tuple(ids), segment_text=text)
                         for m, ids, text in zip(self._messages, self._segments, self._segment_texts))
        return Conversation("", title, now, now, self._system_prompt,
                            ConversationSettings(self._cache_settings, self.sampling), messages)

    def restore(self, conversation) -> None:
        """Take a stored or imported conversation's settings and messages; the cache is rebuilt from
        its transcript at the next turn (pinned prefix + latest tokens)."""
        from .conversation import CUT

        with self._exclusive():
            self._system_prompt = self._check_system_prompt(conversation.system_prompt)
            self._cache_settings = conversation.settings.cache
            self.sampling = conversation.settings.sampling
            self._sink = None
            self._messages, self._segments, self._segment_texts = [], [], []
            self._token_count = 0
            for message in conversation.messages:
                ids = list(message.tokens)
                text = message.segment_text if message.segment_text is not None else self.format.decode(ids)
                content = self.format.decode_visible(ids) if message.status == CUT else message.content
                self._append_message({"role": message.role, "content": content}, ids, text)
            self._stale = True
            self._undo_point = self._regen_point = None

    def save(self, path) -> None:
        """Export the conversation as a JSON conversation file."""
        from pathlib import Path

        from . import conversation_file

        Path(path).write_text(conversation_file.dumps(self.to_conversation()), encoding="utf-8")

    @classmethod
    def load(cls, path, model, tokenizer, **kwargs) -> "ChatSession":
        """A session resuming the conversation in a JSON conversation file (validated: a bad file
        raises `conversation_file.ConversationFileError` naming what is wrong)."""
        from . import conversation_file

        conversation = conversation_file.load_path(path, len(tokenizer))
        session = cls(model, tokenizer, **kwargs)
        session.restore(conversation)
        return session

    # ---- reading state ------------------------------------------------------------------------
    @property
    def messages(self) -> list[dict]:
        return [dict(message) for message in self._messages]

    @property
    def message_count(self) -> int:
        return len(self._messages)

    def message_slice(self, start: int = 0, stop: int | None = None) -> list[dict]:
        """Copies of messages[start:stop]: a view of a long conversation costs what it shows."""
        return [dict(message) for message in self._messages[start:stop]]

    @property
    def seed(self) -> int | None:
        """The fixed seed of sampled replies, or None (each conversation draws its own)."""
        return self._seed

    @property
    def system_prompt(self) -> str | None:
        return self._system_prompt

    @property
    def cache_settings(self) -> CacheSettings:
        return self._cache_settings

    @property
    def transcript(self) -> list[int]:
        """Every token the conversation has encoded, in order."""
        return [token for segment in self._segments for token in segment]

    @property
    def generating(self) -> bool:
        return self._lock.locked()

    def stats(self) -> SessionStats:
        """The conversation's cache numbers, known on the host: reading them waits for nothing."""
        row = self._ensure_row()
        return SessionStats(
            cache=self.engine.row_stats(row),
            conversation_tokens=self._token_count,
            dense_bytes=self._token_count * self.engine.dense_bytes_per_token,
            decoder=self.engine.decoder_name(row),
            turns=self._turns,
            residence=row.residence,
            rebuilt_from_transcript=self._rebuilt_after_drop,
            sink_setting=self._cache_settings.sink,
            pinned_tokens=self._pinned_tokens(),
            seed=self._seed,
        )

    def held_indices(self) -> list[int]:
        """Stream indices of the tokens the cache holds, in stream order."""
        return self.engine.held_indices(self._ensure_row())

    # ---- turns --------------------------------------------------------------------------------
    def send(self, message: str, sampling: SamplingSettings | None = None) -> Iterator[Event]:
        """Stream the reply to `message`: PrefillProgress (long messages), TokenEvents, then TurnEnd.

        Bad input raises ChatError at once; a second concurrent call raises ChatError when iterated.
        """
        text = clean_message(message)
        return self._turn(text, sampling or self.sampling)

    def edit(self, index: int, message: str, sampling: SamplingSettings | None = None) -> Iterator[Event]:
        """Replace user message `index` with `message` and stream a new reply to it: the messages
        after it are dropped, as if the conversation had gone this way.

        Bad input (not a user message, bad text) raises ChatError at once and changes nothing.
        """
        text = clean_message(message)
        with self._exclusive():
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < len(self._messages):
                raise ChatError(f"there is no message {index!r} to edit")
            if self._messages[index]["role"] != "user":
                raise ChatError("only your own messages can be edited")
            # The last user message comes back from its checkpoint; an earlier one from the transcript.
            self._truncate(index, self._undo_point)
        return self._turn(text, sampling or self.sampling)

    def regenerate(self, sampling: SamplingSettings | None = None) -> Iterator[Event]:
        """Drop the last reply and stream a new one to the same message."""
        if not self._messages or self._messages[-1]["role"] != "assistant":
            raise ChatError("there is no reply to regenerate yet")
        return self._regenerate(sampling or self.sampling)

    def stop(self) -> None:
        """Ask a streaming reply to end after the current token; the cache stays consistent."""
        self._stop.set()

    def undo(self) -> None:
        """Remove the last user message and its reply."""
        with self._exclusive():
            users = [i for i, m in enumerate(self._messages) if m["role"] == "user"]
            if not users:
                raise ChatError("there is nothing to undo")
            self._truncate(users[-1], self._undo_point)

    def clear(self) -> None:
        """Start a new conversation with the same settings (the row is kept) and new metrics; with a
        fixed seed, its replies are those a new session with that seed would give."""
        with self._exclusive():
            self._truncate(0, None)
            self.metrics = ConversationMetrics()
            self._undo_point = self._regen_point = None
            if self._seed is not None and self._row is not None:
                self.engine.reseed(self._row, self._seed)

    def close(self) -> None:
        """Give the conversation's memory back now: its cache row (on the device or in host memory)
        and its undo/regenerate snapshots. The cache is rebuilt if the session is used again."""
        if self._row is not None:
            self.engine.close_row(self._row)
            self._stale = True
        self._undo_point = self._regen_point = None

    def configure(
        self,
        system_prompt: str | None | object = _UNCHANGED,
        cache_settings: CacheSettings | None = None,
        seed: int | None | object = _UNCHANGED,
    ) -> str:
        """Change the system prompt, cache size and/or seed; applied at the next turn. Returns what happens.

        A seed restarts the random stream of replies from it (the same conversation then gets the
        same replies); None gives the conversation a fresh random one.
        """
        if seed is not _UNCHANGED and seed is not None:
            check("seed", seed)
        with self._exclusive():
            notes, rebuild = [], False
            if system_prompt is not _UNCHANGED:
                system_prompt = self._check_system_prompt(system_prompt)
            if system_prompt is not _UNCHANGED and system_prompt != self._system_prompt:
                self._system_prompt = system_prompt
                self._sink = None
                if self._messages:
                    self._retemplate_first_message()
                rebuild = True
                notes.append("system prompt updated")
            if cache_settings is not None and cache_settings != self._cache_settings:
                self._cache_settings = cache_settings
                self._sink = None
                rebuild = True
                notes.append(
                    f"cache set to {cache_settings.sink} sink + {cache_settings.window} window tokens"
                )
            if seed is not _UNCHANGED and seed != self._seed:
                self._seed = seed
                if self._row is not None:
                    self.engine.reseed(self._row, seed)
                notes.append("replies draw from a fresh random seed" if seed is None
                             else f"seed {seed}: the same messages get the same replies, from the next one on")
            self._stale = self._stale or rebuild
            if not notes:
                return "nothing changed"
            if self.recorder is not None:
                from .conversation import ConversationSettings

                first = (self._segments[0], self._segment_texts[0]) if self._messages else None
                self.recorder.configure(ConversationSettings(self._cache_settings, self.sampling), self._system_prompt,
                                        first)
            if rebuild and self._messages:
                notes.append("the cache is rebuilt from the transcript (pinned prefix + most recent tokens) at the next turn")
            return "; ".join(notes)

    # ---- internals ----------------------------------------------------------------------------
    def _exclusive(self):
        if not self._lock.acquire(blocking=False):
            raise ChatError("busy: a reply is still streaming; press Stop or wait for it to finish")
        return _Release(self._lock)

    def _check_system_prompt(self, system_prompt: str | None) -> str | None:
        if system_prompt is None:
            return None
        if not isinstance(system_prompt, str):
            raise ChatError(f"the system prompt must be text, got {type(system_prompt).__name__}")
        if not system_prompt.strip():
            return None
        try:
            text = clean_message(system_prompt)
        except ChatError as error:
            raise ChatError(f"the system prompt {str(error).removeprefix('the message ')}") from None
        if len(self.format.encode(text)) > MAX_PINNED:
            raise ChatError(f"the system prompt is too long: keep it under {MAX_PINNED} tokens")
        return text

    def _conversation(self, messages: list[dict] | None = None) -> list[dict]:
        system = [{"role": "system", "content": self._system_prompt}] if self._system_prompt else []
        return system + (self._messages if messages is None else messages)

    def _turn(self, text: str, sampling: SamplingSettings) -> Iterator[Event]:
        with self._exclusive():
            self._stop.clear()
            started = time.perf_counter()
            try:
                self._ensure_cache(rebuild=True)
            except EngineError as error:
                raise _engine_failure(error) from error
            self._undo_point = self._checkpoint(self._undo_point)
            delta = self.format.new_turn_text(self._conversation(), text, self._segment_texts)
            ids = self.format.encode(delta)
            turn = TurnMetrics(prompt_tokens=len(ids))
            user_index = len(self._messages)
            self._append_message({"role": "user", "content": text}, [], delta)
            if self.recorder is not None:
                self.recorder.user_message(text, ids, delta)
            stream = self.engine.prefill(self._row, ids, self.prefill_chunk, self._stop)
            read, reported = 0, 0
            try:
                for done in stream:
                    self._extend_last_segment(ids[read:done])
                    read = done
                    # A long message reports every `prefill_chunk` tokens, however the engine cuts it.
                    if len(ids) > self.prefill_chunk and (done - reported >= self.prefill_chunk or done == len(ids)):
                        reported = done
                        yield PrefillProgress(done, len(ids))
            except EngineError as error:
                self._truncate(user_index, self._undo_point)
                raise _engine_failure(error) from error
            except GeneratorExit:  # the caller left while the message was read: as if stopped
                self._stop.set()
                for done in stream:
                    self._extend_last_segment(ids[read:done])
                    read = done
                self._truncate(user_index, self._undo_point)
                raise
            if stream.reason == "stopped":
                self._truncate(user_index, self._undo_point)
                yield TurnEnd("", "stopped_while_reading", turn)
                return
            turn.prefill_ms = (time.perf_counter() - started) * 1e3
            self._regen_point = self._checkpoint(self._regen_point, with_logits=True)
            yield from self._generate(sampling, turn, started, user_index, self._undo_point)

    def _regenerate(self, sampling: SamplingSettings) -> Iterator[Event]:
        with self._exclusive():
            started = time.perf_counter()
            self._stop.clear()
            keep = len(self._messages) - 1
            try:
                self._truncate(keep, self._regen_point)
                if not self._is_current(self._regen_point):
                    self._ensure_cache(rebuild=False)
                    self._rebuild()
                    self._regen_point = self._checkpoint(self._regen_point, with_logits=True)
            except EngineError as error:
                raise _engine_failure(error) from error
            turn = TurnMetrics(prompt_tokens=len(self._segments[-1]))
            yield from self._generate(sampling, turn, started, keep, self._regen_point)

    def _generate(
        self, sampling: SamplingSettings, turn: TurnMetrics, started: float, keep: int,
        checkpoint: _Checkpoint | None,
    ) -> Iterator[Event]:
        self._append_message({"role": "assistant", "content": ""}, [], "")
        if self.recorder is not None:
            self.recorder.begin_reply()
        stream, fed = self.engine.generate(self._row, sampling, self.format.stop_ids, self._stop)
        generated: list[int] = []
        shown = ""
        failed = False
        try:
            for token_id, latency in stream:
                generated.append(token_id)
                self._extend_last_segment([token_id])
                turn.token_ms.append(latency)
                self.metrics.record_token(latency)
                if len(generated) == 1:
                    turn.ttft_ms = (time.perf_counter() - started) * 1e3
                visible = self.format.decode_visible(generated)
                # Hold back a partial UTF-8 character until the next token completes it.
                piece = "" if visible.endswith("\ufffd") else visible[len(shown):]
                shown += piece
                if self.recorder is not None:
                    self.recorder.reply_token(token_id, piece)
                yield TokenEvent(piece, token_id, latency, len(generated) - 1)
        except EngineError as error:  # the step failed: the checkpoint brings the row back
            failed = True
            self._truncate(keep, checkpoint)
            raise _engine_failure(error) from error
        finally:
            if not failed:
                if stream.reason is None:  # the caller left mid-stream: end the job first
                    self._stop.set()
                    for _, latency in stream:
                        turn.token_ms.append(latency)
                        self.metrics.record_token(latency)
                # Every token the engine fed to the cache belongs to the transcript, seen or not.
                self._extend_last_segment(fed[len(generated):])
                reply = self.format.decode_visible(fed)
                self._messages[-1]["content"] = reply
                self._segment_texts[-1] = self.format.decode(fed)
                turn.stop_reason = stream.reason
                self.metrics.record_turn(turn)
                if self.recorder is not None:
                    self.recorder.end_reply(turn.stop_reason, reply, fed)
        yield TurnEnd(reply, turn.stop_reason, turn)

    def _append_message(self, message: dict, ids: list[int], text: str) -> None:
        self._turns += message["role"] == "user"
        self._messages.append(message)
        self._segments.append(list(ids))
        self._segment_texts.append(text)
        self._token_count += len(ids)

    def _extend_last_segment(self, ids: list[int]) -> None:
        self._segments[-1].extend(ids)
        self._token_count += len(ids)

    def _truncate(self, keep_messages: int, checkpoint: _Checkpoint | None) -> None:
        """Keep the first `keep_messages` messages; restore the row from a checkpoint that fits."""
        if self.recorder is not None and keep_messages < len(self._messages):
            self.recorder.truncate(keep_messages)
        self._turns -= sum(message["role"] == "user" for message in self._messages[keep_messages:])
        del self._messages[keep_messages:]
        del self._segment_texts[keep_messages:]
        for segment in self._segments[keep_messages:]:
            self._token_count -= len(segment)
        del self._segments[keep_messages:]
        if keep_messages == 0 and self._row is not None and not self._stale_shape():
            self.engine.reset(self._row)
            self._epoch += 1
            self._stale = False
        elif checkpoint is not None and self._is_current(checkpoint) and checkpoint.messages == keep_messages:
            self.engine.restore(self._row, checkpoint.snapshot)
        else:
            self._stale = True

    def _checkpoint(self, reuse: _Checkpoint | None, with_logits: bool = False) -> _Checkpoint:
        into = reuse.snapshot if reuse is not None and reuse.epoch == self._epoch else None
        snapshot = self.engine.snapshot(self._row, with_logits, into)
        return _Checkpoint(snapshot, len(self._messages), self._epoch)

    def _is_current(self, checkpoint: _Checkpoint | None) -> bool:
        return (checkpoint is not None and checkpoint.epoch == self._epoch and not self._stale
                and self._row is not None and not self._row.lost)

    def _pinned_tokens(self) -> int:
        if self._pinned is None or self._pinned[0] != self._system_prompt:
            self._pinned = (self._system_prompt, self.format.pinned_prefix_length(self._system_prompt))
        return self._pinned[1] if self._cache_settings.pin_system_prompt else 0

    def _sink_size(self) -> int:
        if self._sink is None:
            self._sink = max(self._cache_settings.sink, self._pinned_tokens())
        return self._sink

    def _ensure_row(self):
        if self._row is None or self._row.closed:
            self._row = self.engine.open_row(self._sink_size(), self._cache_settings.window, self._seed)
            weakref.finalize(self, self.engine.release_row, self._row)
            self._epoch += 1
            self._stale = bool(self._segments)
        return self._row

    def _stale_shape(self) -> bool:
        row = self._row
        return row is None or row.closed or (row.sink, row.window) != (self._sink_size(), self._cache_settings.window)

    def _ensure_cache(self, rebuild: bool) -> None:
        row = self._ensure_row()
        if self._stale_shape():
            self.engine.resize(row, self._sink_size(), self._cache_settings.window)
            self._epoch += 1
            self._stale = bool(self._segments)
        if row.lost:  # the host budget dropped it while idle
            self._stale = True
            self._rebuilt_after_drop = True
        if rebuild and self._stale:
            self._rebuild()

    def _rebuild(self) -> None:
        """Re-encode the transcript: all of it if it fits, else the pinned prefix + the latest tokens."""
        row = self._row
        self.engine.reset(row)
        self._epoch += 1
        tokens = self.transcript
        if len(tokens) > row.sink + row.window:
            tokens = tokens[: row.sink] + tokens[-row.window :]
        for _ in self.engine.prefill(row, tokens, self.prefill_chunk, threading.Event()):
            pass
        self._stale = False

    def _retemplate_first_message(self) -> None:
        """The system prompt lives in the first message's template text: render that again."""
        first = self._messages[0]
        text = self.format.new_turn_text([], first["content"], [])
        ids = self.format.encode(text)
        self._token_count += len(ids) - len(self._segments[0])
        self._segments[0], self._segment_texts[0] = ids, text


def _engine_failure(error: EngineError) -> ChatError:
    """The user's message for a failed engine job (the turn was dropped)."""
    if "out of memory" in str(error):
        return ChatError("out of GPU memory while answering: nothing from this turn was kept; "
                         "try a smaller window or a shorter message")
    return ChatError(f"the reply failed: {error}; nothing from this turn was kept")


class _Release:
    """Context manager that releases an already-acquired lock."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        self._lock.release()
