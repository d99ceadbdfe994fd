"""The page's event handlers: each finds the caller's own ChatSession by Gradio's session hash.

Every event runs with Gradio's preprocessing off and checks its inputs itself (inputs.py). Whatever
a person or an API client gets wrong is a notice: a toast and the status line, never Gradio's red
"Error" badges on the outputs or a traceback in the server log. Every number shown is read from
the engine (`ChatSession.stats()`, `session.metrics`, `Engine.stats()`).

A message goes through two events: Send (quick) checks it and shows it at once; the reply step
(in the generation queue) takes it and streams the answer. What Send accepted waits in the
session's page state under a ticket; the reply step takes it once, so answering the same message
twice is refused.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import replace
from typing import Iterator

import gradio as gr

from app_support import inputs
from app_support.app_config import AppConfig
from app_support.chat_view import LATEST_LABEL, earlier_label
from app_support.panel import latency_frame, metrics_markdown, read_metrics
from app_support.sessions import Edit, GenerationSlots, Message, PageState, Refused, SessionRegistry, forget_gradio_session
from lckv_stream.buckets import batch_class
from lckv_stream.chat import CacheSettings, ChatSession, PrefillProgress, TokenEvent, TurnEnd
from lckv_stream.chat_format import ChatError, ChatFormat, clean_message
from lckv_stream.engine import Engine, EngineSettings

NOTHING_CHANGED = "nothing changed"  # what session.configure says when the settings are the same
PLOT_EVERY_S = 0.5  # while a reply streams, the latency plot is redrawn at most this often
DEMO_TURNS = (5, 500)
NO_MESSAGE = "there is no message to answer: send one first (each message is answered once)"

END_NOTES = {
    "eos": "the model finished its answer",
    "max_new_tokens": "reached the max new tokens setting",
    "stopped": "stopped",
    "stopped_while_reading": "stopped while reading your message: it was not kept, and it is back in the box",
}

# Scripted user turns for the long-conversation demo, cycled; the first few are the page's examples.
SCRIPT = (
    "Hi! Can you tell me a fun fact about space?",
    "What is the capital of France?",
    "Give me a tip for learning a new language.",
    "Name three fruits that are red.",
    "How do I boil an egg?",
    "Write one sentence about the ocean.",
    "What is 12 times 12?",
    "Suggest a name for a pet cat.",
)


def as_update(value) -> dict:
    """`value` as a Gradio update, for an output that other updates skip (the latency plot).

    A gr.skip() makes Gradio 6.31 replace the session's copy of the component, and the next plain
    value then adds a config for that copy, value included, and keeps it: a plot and a chat per
    turn grew the server 20% over 500 turns. A value sent as an update replaces the config in
    place. An input (the message box) must get no skips at all: reading it adds the config too.
    """
    return gr.update(value=value)


class ChatApp:
    """The event handlers, the sessions they serve and the engine that decodes for all of them."""

    def __init__(self, model, tokenizer, config: AppConfig) -> None:
        self.model = model
        default_batch = EngineSettings.for_device(model.device).max_batch
        self.config = config = replace(config, max_generations=config.max_generations or default_batch)
        # One engine for every browser session: it decodes the replies being generated together.
        # The bucket of the default settings is built (and on a GPU compiled) before the first user.
        default_sink = max(config.sink, ChatFormat(tokenizer).pinned_prefix_length(None))
        self.engine = Engine(model, EngineSettings.for_device(
            model.device, max_batch=batch_class(config.max_generations), warm_shape=(default_sink, config.window)))
        self.registry = SessionRegistry(
            lambda: ChatSession(
                model, tokenizer,
                cache_settings=CacheSettings(config.sink, config.window),
                engine=self.engine,
            ),
            idle_seconds=config.idle_minutes * 60,
        )
        self.slots = GenerationSlots(config.max_generations)
        self.blocks: gr.Blocks | None = None  # the page, once built (its state_holder is set at launch)
        self._drafts = itertools.count()
        self._tickets = itertools.count(1)

    # ---- views --------------------------------------------------------------------------------
    def metrics(self, session: ChatSession) -> dict:
        return read_metrics(session, self.model.device, len(self.registry), self.engine.stats())

    def view(
        self, session: ChatSession, page: PageState, status: str, reply: str | None = None,
        draft: str | None = None, plot: bool = True, running: bool | None = None, sent: str | None = None,
    ) -> tuple:
        """(chat, draft to put back, status, metrics table, latency plot, raw metrics, earlier
        messages button, latest messages button, Stop button).

        The chat is the page's window of the conversation (chat_view.py). `reply` is the partial
        reply while it streams (the engine fills the message at the end); `sent` a message Send
        accepted, shown before the reply step takes it; `draft` a message the engine did not keep:
        `restore_draft` puts it back in the message box. `plot=False` leaves the plot as shown: Gradio
        walks every value it sends. Stop shows while `running` (default: while the session generates).
        """
        count = session.message_count + (sent is not None)
        first, end = page.window.bounds(count)
        page.window.shown_from = first
        messages = session.message_slice(first, min(end, session.message_count))
        if sent is not None and end == count:
            messages.append({"role": "user", "content": sent})
        elif reply is not None and messages and end == count:
            messages[-1]["content"] = reply
        numbers = self.metrics(session)
        return (
            messages,  # never skipped, so it can stay a plain value (see as_update)
            gr.skip() if draft is None else (next(self._drafts), draft),  # numbered: each one is a change
            status,
            metrics_markdown(numbers),
            as_update(latency_frame(session)) if plot else gr.skip(),
            numbers,
            gr.update(value=earlier_label(first), visible=first > 0),
            gr.update(value=LATEST_LABEL, visible=end < count),
            gr.update(visible=session.generating if running is None else running),
        )

    def notice(self, session: ChatSession, page: PageState, error: Exception | str, **view) -> tuple:
        """A problem as a toast and the status line (no error badges, nothing in the server log)."""
        gr.Warning(str(error))
        return self.view(session, page, f"⚠️ {error}", **view)

    def _lookup(self, request: gr.Request) -> tuple[ChatSession, PageState, bool]:
        session, created = self.registry.get(request.session_hash)
        return session, self.registry.page(request.session_hash), created

    # ---- page -----------------------------------------------------------------------------------
    def open(self, request: gr.Request) -> tuple:
        """Page load: create this browser's session and show its state (the latest messages)."""
        session, page, _ = self._lookup(request)
        page.window.follow()
        return self.view(session, page, "Ready.")

    def close(self, request: gr.Request) -> None:
        """Tab closed: free the session at once, and Gradio's own state of it."""
        self.registry.drop(request.session_hash)
        if self.blocks is not None:
            forget_gradio_session(self.blocks.state_holder, request.session_hash)

    def restore_draft(self, draft: tuple[int, str] | None) -> str:
        """Put a message the engine did not keep back in the message box (the page calls it when one
        is set; called over the API with none, it clears the box)."""
        if draft is None:
            gr.Warning("there is no message to put back")
            return ""
        return draft[1]

    def example(self, selected: gr.SelectData) -> str:
        """An example prompt picked in the empty chat: it goes to the message box, then is sent."""
        value = selected.value
        return value.get("text", "") if isinstance(value, dict) else str(value or "")

    def earlier(self, request: gr.Request) -> tuple:
        """Show earlier messages of a long conversation."""
        session, page, _ = self._lookup(request)
        page.window.earlier(session.message_count)
        first, end = page.window.bounds(session.message_count)
        return self.view(session, page, f"Showing messages {first + 1:,}–{end:,} of {session.message_count:,}.",
                         plot=False)

    def latest(self, request: gr.Request) -> tuple:
        session, page, _ = self._lookup(request)
        page.window.follow()
        return self.view(session, page, "Showing the latest messages.", plot=False)

    # ---- settings ------------------------------------------------------------------------------
    def configure(self, system_prompt: object, sink: object, window: object, seed: object, request: gr.Request) -> str:
        """Apply settings to the next turn; the note under the settings says what the engine will change."""
        session, _, _ = self._lookup(request)
        try:
            change = self._configure(session, system_prompt, sink, window, seed)
        except ValueError as error:
            gr.Warning(str(error))
            return f"⚠️ Settings not applied: {error}"
        return "Settings unchanged." if change == NOTHING_CHANGED else f"Settings: {change}."

    def _configure(self, session: ChatSession, system_prompt: object, sink: object, window: object, seed: object) -> str:
        """session.configure with the page's values, checked first.

        Raises ValueError (ChatError included) for a bad value, or while a reply streams.
        """
        return session.configure(system_prompt=inputs.text("system prompt", system_prompt) or None,
                                 cache_settings=inputs.cache(sink, window), seed=inputs.seed(seed))

    # ---- a message and its reply ------------------------------------------------------------
    def send(
        self, message: object, system_prompt: object, sink: object, window: object, seed: object,
        request: gr.Request,
    ) -> tuple:
        """Check the message and settings, show the message at once; the reply step answers it.

        Returns the view, the message box and the ticket the reply step answers. A refused message
        stays in the box; the reply step then only repeats why.
        """
        session, page, created = self._lookup(request)
        ticket = next(self._tickets)
        try:
            if session.generating:
                raise ChatError("a reply is still being written: wait for it or press Stop, then send")
            text = clean_message(message)
            change = self._configure(session, system_prompt, sink, window, seed)
        except ValueError as error:
            refused = self.notice(session, page, error)
            page.pending = Refused(ticket, refused[2])
            return refused + (inputs.box_text(message), ticket)
        page.pending = Message(ticket, text)
        page.window.follow()
        notes = []
        if created and self.registry.was_evicted(request.session_hash):
            notes.append(f"This conversation was idle for over {self.config.idle_minutes:g} minutes and was "
                         "closed to free memory; a new one starts here.")
        if change != NOTHING_CHANGED:
            notes.append(f"Settings: {change}.")
        if self.slots.full():
            notes.append(f"Busy: all {self.slots.limit} generation slots are in use; your message is queued "
                         "and is answered as soon as one frees up.")
        shown = self.view(session, page, " ".join(notes) or "Sending…", plot=False, running=True, sent=text)
        return shown + ("", ticket)

    def edit(self, edited: gr.EditData, request: gr.Request) -> tuple:
        """A user message edited in the chat: the conversation goes back to it, the new text replaces
        it and the reply step answers it. Returns the view and the ticket."""
        session, page, _ = self._lookup(request)
        ticket = next(self._tickets)
        try:
            if session.generating:
                raise ChatError("a reply is still being written: wait for it or press Stop, then edit")
            shown = edited.index[0] if isinstance(edited.index, (list, tuple)) else edited.index
            index = page.window.absolute(inputs.number("index", shown, (0, 1 << 40), whole=True))
            target = session.message_slice(index, index + 1)
            if not target or target[0]["role"] != "user":
                raise ChatError("only your own messages can be edited")
            if target[0]["content"] != edited.previous_value:
                raise ChatError("the conversation changed under this edit: try it again")
            text = clean_message(edited.value)
        except ValueError as error:
            refused = self.notice(session, page, error)
            page.pending = Refused(ticket, refused[2])
            return refused + (ticket,)
        page.pending = Edit(ticket, index, text)
        page.window.follow()
        return self.view(session, page, "Editing: the conversation goes back to this message…", plot=False,
                         running=True) + (ticket,)

    def respond(
        self, ticket: int | None, max_new_tokens: object, temperature: object, top_p: object,
        request: gr.Request, progress: gr.Progress = gr.Progress(),
    ) -> Iterator[tuple]:
        """Stream the reply to what Send (or an edit) accepted under `ticket`: once."""
        session, page, _ = self._lookup(request)
        pending, page.pending = page.pending, None
        if pending is None or pending.ticket != ticket:
            page.pending = pending  # a newer message's: leave it for its own reply step
            yield self.notice(session, page, NO_MESSAGE)
            return
        if isinstance(pending, Refused):
            yield self.view(session, page, pending.note, plot=False)
            return
        try:
            sampling = inputs.sampling(max_new_tokens, temperature, top_p)
            page.window.follow()
            if isinstance(pending, Edit):
                events = session.edit(pending.index, pending.text, sampling)
            else:
                events = session.send(pending.text, sampling)
        except ValueError as error:
            yield self.notice(session, page, error, draft=pending.text)
            return
        yield from self._stream(session, page, events, progress, draft=pending.text)

    def regenerate(
        self, max_new_tokens: object, temperature: object, top_p: object,
        request: gr.Request, progress: gr.Progress = gr.Progress(),
    ) -> Iterator[tuple]:
        """Replace the last reply with a new one."""
        session, page, _ = self._lookup(request)
        try:
            events = session.regenerate(inputs.sampling(max_new_tokens, temperature, top_p))
        except ValueError as error:
            yield self.notice(session, page, error)
            return
        page.window.follow()
        yield from self._stream(session, page, events, progress)

    def long_conversation(
        self, turns: object, max_new_tokens: object, temperature: object, top_p: object,
        request: gr.Request, progress: gr.Progress = gr.Progress(),
    ) -> Iterator[tuple]:
        """Drive `turns` scripted user turns through this session; Stop ends the run."""
        session, page, _ = self._lookup(request)
        page.halt.clear()
        try:
            turns = inputs.number("turns", turns, DEMO_TURNS, whole=True)
            sampling = inputs.sampling(max_new_tokens, temperature, top_p)
        except ValueError as error:
            yield self.notice(session, page, error)
            return
        page.window.follow()
        before = self.metrics(session)
        for turn in range(turns):
            if page.halt.is_set():
                yield self.view(session, page, f"Long conversation stopped after {turn} of {turns} turns.", running=False)
                return
            try:
                events = session.send(SCRIPT[turn % len(SCRIPT)], sampling)
            except ValueError as error:
                yield self.notice(session, page, error, running=False)
                return
            end = yield from self._stream(session, page, events, progress,
                                          label=f"Long conversation, turn {turn + 1}/{turns}: ", last=turn == turns - 1)
            if end is None:
                return
        after = self.metrics(session)
        yield self.view(session, page, f"Long conversation done: {turns} turns. Conversation "
                        f"{before['conversation_tokens']:,} → {after['conversation_tokens']:,} tokens; KV cache "
                        f"{before['cache_mb']:.2f} → {after['cache_mb']:.2f} MB.", running=False)

    # ---- controls -------------------------------------------------------------------------------
    def stop(self, request: gr.Request) -> None:
        """Stop this session's reply after the current token (or prompt chunk); its own last update says so.

        A toast, not the status line: this event can finish after the reply's final update and would
        then cover it.
        """
        if self.registry.stop(request.session_hash):
            gr.Info("Stopping after the current token…")

    def undo(self, request: gr.Request) -> tuple:
        return self._edit_conversation(request, "undo", "Removed the last message and its reply.")

    def clear(self, request: gr.Request) -> tuple:
        """A new conversation (the Clear button and the chat's own trash icon)."""
        return self._edit_conversation(request, "clear", "New conversation.")

    def _edit_conversation(self, request: gr.Request, action: str, done: str) -> tuple:
        session, page, _ = self._lookup(request)
        try:
            getattr(session, action)()
        except ChatError as error:
            return self.notice(session, page, error)
        page.window.follow()
        return self.view(session, page, done)

    def _stream(
        self, session: ChatSession, page: PageState, events, progress: gr.Progress, draft: str | None = None,
        label: str = "", last: bool = True,
    ) -> Iterator[tuple]:
        """Relay engine events as views; returns the TurnEnd, or None when the engine refused the turn.

        On a ChatError (busy, out of memory) the engine has already dropped the turn; the user's
        message goes back into the box. If the page stops listening, closing `events` ends the turn.
        Stop shows until the turn ends (until the last turn, for a run of several).
        """
        reply = ""
        plotted = float("-inf")  # the first token redraws the plot
        try:
            with self.slots.hold():
                for event in events:
                    if isinstance(event, PrefillProgress):
                        progress((event.done, event.total), desc="Reading your message", unit="tokens")
                        yield self.view(session, page, f"{label}Reading your message: {event.done:,} / {event.total:,} "
                                        "tokens (the cache keeps the pinned start and the latest window).",
                                        plot=False, running=True)
                    elif isinstance(event, TokenEvent):
                        reply += event.text
                        replot = time.monotonic() - plotted >= PLOT_EVERY_S
                        plotted = time.monotonic() if replot else plotted
                        yield self.view(session, page, f"{label}Streaming… {event.index + 1} tokens", reply=reply,
                                        plot=replot, running=True)
                    elif isinstance(event, TurnEnd):
                        lost = event.reason == "stopped_while_reading"
                        note = f"{label}Done: {event.metrics.new_tokens} tokens, {END_NOTES[event.reason]}."
                        yield self.view(session, page, note, draft=draft if lost else None, running=not last)
                        return event
        except ChatError as error:
            yield self.notice(session, page, error, draft=draft, running=False)
        finally:
            events.close()
        return None
