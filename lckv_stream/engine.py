"""`ChatSession`: a conversation with a persistent sink + window cache.

Each message owns the tokens it added to the transcript (a user message: the template text around
it; an assistant message: the sampled tokens). The cache always reflects the transcript, so a new
turn encodes only its own tokens. Undo and regenerate restore a cache snapshot taken at the start of
the last turn; when none fits (after a settings change) the cache is rebuilt from the transcript.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, replace
from typing import Iterator, Union

import torch

from .cache import CacheStats, SinkWindowCache, validate_cache_size
from .chat_format import ChatError, ChatFormat, clean_message
from .decoding import gpu_lock, make_decoder, prefill_in_chunks
from .metrics import ConversationMetrics, Stopwatch, TurnMetrics, synchronize
from .sampling import SamplingSettings

MAX_WINDOW = 1 << 20
MAX_PINNED = 4096
_UNCHANGED = object()


@dataclass(frozen=True)
class CacheSettings:
    """Cache size: `sink` first tokens + `window` recent ones; the system prompt can be pinned."""

    sink: int = 4
    window: int = 1024
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


@dataclass
class _Checkpoint:
    cache_state: dict[str, torch.Tensor]
    messages: int
    epoch: int
    logits: torch.Tensor | None = None


class ChatSession:
    """One conversation: messages, their tokens, the cache, sampling and timings."""

    def __init__(
        self,
        model,
        tokenizer,
        system_prompt: str | None = None,
        cache_settings: CacheSettings = CacheSettings(),
        sampling: SamplingSettings = SamplingSettings(),
        prefill_chunk: int = 256,
        seed: int | None = None,
        decoder_factory=make_decoder,
    ) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk must be at least 1, got {prefill_chunk}")
        self.model = model
        self.format = ChatFormat(tokenizer)
        self.sampling = sampling
        self.prefill_chunk = prefill_chunk
        self.metrics = ConversationMetrics()
        self._decoder_factory = decoder_factory
        self._generator = torch.Generator(device=model.device)
        if seed is not None:
            self._generator.manual_seed(seed)
        self._lock = threading.Lock()
        self._gpu = gpu_lock(model.device)  # shared by every session on the GPU: see gpu_lock
        self._stop = threading.Event()
        self._system_prompt = self._check_system_prompt(system_prompt)
        self._cache_settings = cache_settings
        self._sink: int | None = None  # sink size in use: settings.sink or the pinned prefix, if longer
        self._messages: list[dict] = []
        self._segments: list[list[int]] = []  # tokens each message added, aligned with messages
        self._segment_texts: list[str] = []
        self._token_count = 0
        self._cache: SinkWindowCache | None = None
        self._decoder = None
        self._stale = True  # cache does not reflect the transcript
        self._epoch = 0
        self._undo_point: _Checkpoint | None = None
        self._regen_point: _Checkpoint | None = None

    # ---- reading state ------------------------------------------------------------------------
    @property
    def messages(self) -> list[dict]:
        return [dict(message) for message in self._messages]

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
        with self._gpu:  # the first call makes the cache and its decoder; reading counts synchronizes
            cache = self._ensure_cache(rebuild=False)
            cache_stats = cache.stats()
        return SessionStats(
            cache=cache_stats,
            conversation_tokens=self._token_count,
            dense_bytes=self._token_count * cache.dense_bytes_per_token,
            decoder=self._decoder.name,
            turns=sum(1 for m in self._messages if m["role"] == "user"),
        )

    # ---- turns --------------------------------------------------------------------------------
    def send(self, message: str, sampling: SamplingSettings | None = None) -> Iterator[Event]:
        """Stream the reply to `message`: PrefillProgress (long messages), TokenEvents, then TurnEnd.

        Bad input raises ChatError at once; a second concurrent call raises ChatError when iterated.
        """
        text = clean_message(message)
        return self._taking_turns(self._turn(text, sampling or self.sampling))

    def regenerate(self, sampling: SamplingSettings | None = None) -> Iterator[Event]:
        """Drop the last reply and stream a new one to the same message."""
        if not self._messages or self._messages[-1]["role"] != "assistant":
            raise ChatError("there is no reply to regenerate yet")
        return self._taking_turns(self._regenerate(sampling or self.sampling))

    def stop(self) -> None:
        """Ask a streaming reply to end after the current token; the cache stays consistent."""
        self._stop.set()

    def undo(self) -> None:
        """Remove the last user message and its reply."""
        with self._exclusive(), self._gpu:
            users = [i for i, m in enumerate(self._messages) if m["role"] == "user"]
            if not users:
                raise ChatError("there is nothing to undo")
            self._truncate(users[-1], self._undo_point)

    def clear(self) -> None:
        """Start a new conversation with the same settings (buffers are reused)."""
        with self._exclusive(), self._gpu:
            self._truncate(0, None)

    def configure(
        self,
        system_prompt: str | None | object = _UNCHANGED,
        cache_settings: CacheSettings | None = None,
    ) -> str:
        """Change the system prompt and/or cache size; applied at the next turn. Returns what happens."""
        with self._exclusive():
            notes = []
            if system_prompt is not _UNCHANGED and system_prompt != self._system_prompt:
                self._system_prompt = self._check_system_prompt(system_prompt)
                self._sink = None
                if self._messages:
                    self._retemplate_first_message()
                self._stale = True
                notes.append("system prompt updated")
            if cache_settings is not None and cache_settings != self._cache_settings:
                self._cache_settings = cache_settings
                self._sink = None
                self._stale = True
                notes.append(
                    f"cache set to {cache_settings.sink} sink + {cache_settings.window} window tokens"
                )
            if not notes:
                return "nothing changed"
            if self._messages:
                notes.append("the cache is rebuilt from the transcript (pinned prefix + most recent tokens) at the next turn")
            return "; ".join(notes)

    # ---- internals ----------------------------------------------------------------------------
    def _taking_turns(self, events: Iterator[Event]) -> Iterator[Event]:
        """`events` run under the GPU lock from one event to the next, and without it while the
        caller handles an event: sessions on other threads take turns on the GPU in between."""
        try:
            while True:
                with self._gpu:
                    event = next(events, None)
                if event is None:
                    return
                yield event
        finally:
            with self._gpu:
                events.close()  # a stream left early: its clean-up touches the cache too

    def _exclusive(self):
        if not self._lock.acquire(blocking=False):
            raise ChatError("busy: a reply is still streaming; press Stop or wait for it to finish")
        return _Release(self._lock)

    def _check_system_prompt(self, system_prompt: str | None) -> str | None:
        if system_prompt is None or not str(system_prompt).strip():
            return None
        text = clean_message(system_prompt)
        if len(self.format.encode(text)) > MAX_PINNED:
            raise ChatError(f"the system prompt is too long: keep it under {MAX_PINNED} tokens")
        return text

    def _conversation(self, messages: list[dict] | None = None) -> list[dict]:
        system = [{"role": "system", "content": self._system_prompt}] if self._system_prompt else []
        return system + (self._messages if messages is None else messages)

    def _turn(self, text: str, sampling: SamplingSettings) -> Iterator[Event]:
        with self._exclusive():
            self._stop.clear()
            cache = self._ensure_cache(rebuild=True)
            self._undo_point = self._checkpoint(self._undo_point)
            delta = self.format.new_turn_text(self._conversation(), text, self._segment_texts)
            ids = self.format.encode(delta)
            turn = TurnMetrics(prompt_tokens=len(ids))
            started = time.perf_counter()
            watch = Stopwatch()
            user_index = len(self._messages)
            self._append_message({"role": "user", "content": text}, [], delta)
            try:
                logits = None
                for done, logits in prefill_in_chunks(self._decoder, ids, self.prefill_chunk, cache.device):
                    self._extend_last_segment(ids[len(self._segments[-1]) : done])
                    if len(ids) > self.prefill_chunk:
                        yield PrefillProgress(done, len(ids))
                        if self._stop.is_set() and done < len(ids):
                            self._truncate(user_index, self._undo_point)
                            yield TurnEnd("", "stopped_while_reading", turn)
                            return
                synchronize(cache.device)
                turn.prefill_ms = watch.lap()
                self._regen_point = self._checkpoint(self._regen_point, logits)
                yield from self._generate(logits, sampling, turn, started)
            except torch.OutOfMemoryError as error:
                self._fail_out_of_memory(user_index, self._undo_point, error)

    def _regenerate(self, sampling: SamplingSettings) -> Iterator[Event]:
        with self._exclusive():
            started = time.perf_counter()
            self._stop.clear()
            self._truncate(len(self._messages) - 1, self._regen_point)
            logits = self._regen_point.logits if self._is_current(self._regen_point) else None
            if logits is None:
                logits = self._rebuild()
                self._regen_point = self._checkpoint(self._regen_point, logits)
            turn = TurnMetrics(prompt_tokens=len(self._segments[-1]))
            keep = len(self._messages)
            try:
                yield from self._generate(logits.clone(), sampling, turn, started)
            except torch.OutOfMemoryError as error:
                self._fail_out_of_memory(keep, self._regen_point, error)

    def _generate(
        self, logits: torch.Tensor, sampling: SamplingSettings, turn: TurnMetrics, started: float
    ) -> Iterator[Event]:
        device = self._cache.device
        self._append_message({"role": "assistant", "content": ""}, [], "")
        generated: list[int] = []
        shown = ""
        reason = "max_new_tokens"
        watch = Stopwatch()
        try:
            for index in range(sampling.max_new_tokens):
                watch.lap()  # time the consumer spent between tokens is not model latency
                # Feed the token before showing it: whatever stops the stream, cache == transcript.
                # The step is queued before the id is read, so the GPU never waits for the host.
                token, logits = self._decoder.sample_and_step(logits, sampling, self._generator)
                token_id = int(token[0])
                generated.append(token_id)
                self._extend_last_segment([token_id])
                synchronize(device)
                latency = watch.lap()
                turn.token_ms.append(latency)
                self.metrics.record_token(latency)
                if index == 0:
                    turn.ttft_ms = (time.perf_counter() - started) * 1e3
                visible = self.format.decode_visible(generated)
                # Hold back a partial UTF-8 character until the next token completes it.
                piece = "" if visible.endswith("\ufffd") else visible[len(shown):]
                shown += piece
                yield TokenEvent(piece, token_id, latency, index)
                if token_id in self.format.stop_ids:
                    reason = "eos"
                    break
                if self._stop.is_set():
                    reason = "stopped"
                    break
        finally:
            reply = self.format.decode_visible(generated)
            self._messages[-1]["content"] = reply
            self._segment_texts[-1] = self.format.decode(generated)
            turn.stop_reason = reason
            self.metrics.record_turn(turn)
        yield TurnEnd(reply, reason, turn)

    def _append_message(self, message: dict, ids: list[int], text: str) -> None:
        self._messages.append(message)
        self._segments.append(list(ids))
        self._segment_texts.append(text)
        self._token_count += len(ids)

    def _extend_last_segment(self, ids: list[int]) -> None:
        self._segments[-1].extend(ids)
        self._token_count += len(ids)

    def _truncate(self, keep_messages: int, checkpoint: _Checkpoint | None) -> None:
        """Keep the first `keep_messages` messages; restore the cache from a checkpoint that fits."""
        del self._messages[keep_messages:]
        del self._segment_texts[keep_messages:]
        for segment in self._segments[keep_messages:]:
            self._token_count -= len(segment)
        del self._segments[keep_messages:]
        if keep_messages == 0 and self._cache is not None:
            self._cache.reset()
            self._epoch += 1
            self._stale = False
        elif checkpoint is not None and self._is_current(checkpoint) and checkpoint.messages == keep_messages:
            self._cache.restore(checkpoint.cache_state)
        else:
            self._stale = True

    def _checkpoint(self, reuse: _Checkpoint | None, logits: torch.Tensor | None = None) -> _Checkpoint:
        fits = reuse is not None and reuse.epoch == self._epoch
        state = self._cache.snapshot(into=reuse.cache_state if fits else None)
        saved_logits = None if logits is None else logits.detach().clone()
        return _Checkpoint(state, len(self._messages), self._epoch, saved_logits)

    def _is_current(self, checkpoint: _Checkpoint | None) -> bool:
        return checkpoint is not None and checkpoint.epoch == self._epoch and not self._stale

    def _sink_size(self) -> int:
        if self._sink is None:
            settings = self._cache_settings
            pinned = self.format.pinned_prefix_length(self._system_prompt) if settings.pin_system_prompt else 0
            self._sink = max(settings.sink, pinned)
        return self._sink

    def _cache_shape_changed(self) -> bool:
        return (self._cache.sink, self._cache.window) != (self._sink_size(), self._cache_settings.window)

    def _ensure_cache(self, rebuild: bool) -> SinkWindowCache:
        if self._cache is None or self._cache_shape_changed():
            self._cache = None  # free the old buffers before allocating new ones
            self._cache = self.model.new_cache(self._sink_size(), self._cache_settings.window)
            self._decoder = self._decoder_factory(self.model, self._cache)
            self._epoch += 1
            self._stale = bool(self._segments)
        if rebuild and self._stale:
            self._rebuild()
        return self._cache

    def _rebuild(self) -> torch.Tensor | None:
        """Re-encode the transcript: all of it if it fits, else the pinned prefix + the latest tokens."""
        cache = self._cache
        cache.reset()
        self._epoch += 1
        tokens = self.transcript
        if len(tokens) > cache.capacity:
            tokens = tokens[: cache.sink] + tokens[-cache.window :]
        logits = None
        for _, logits in prefill_in_chunks(self._decoder, tokens, self.prefill_chunk, cache.device):
            pass
        self._stale = False
        return logits

    def _retemplate_first_message(self) -> None:
        """The system prompt lives in the first message's template text: render that again."""
        first = self._messages[0]
        text = self.format.new_turn_text([], first["content"], [])
        ids = self.format.encode(text)
        self._token_count += len(ids) - len(self._segments[0])
        self._segments[0], self._segment_texts[0] = ids, text

    def _fail_out_of_memory(self, keep_messages: int, checkpoint: _Checkpoint | None, error: Exception) -> None:
        """Drop what the failed turn added, free cached GPU blocks, and report; the session stays usable."""
        self._truncate(keep_messages, checkpoint)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise ChatError(
            "out of GPU memory while answering: nothing from this turn was kept; "
            "try a smaller window or a shorter message"
        ) from error


class _Release:
    """Context manager that releases an already-acquired lock."""

    def __init__(self, lock: threading.Lock) -> None:
        self._lock = lock

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        self._lock.release()
