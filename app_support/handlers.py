"""The page's event handlers: each finds the caller's own ChatSession by Gradio's session hash.

Every event runs with Gradio's preprocessing off and checks its inputs itself (inputs.py). Whatever
a person or an API client gets wrong is a notice: a toast and the status line, never Gradio's red
"Error" badges on the outputs or a traceback in the server log. Every number shown is read from
the engine (`ChatSession.stats()`, `session.metrics`, `Engine.stats()`).

A message goes through two events: Send (quick) checks it and shows it at once; the reply step
(in the generation queue) takes it and streams the answer. What Send accepted waits in the
session's page state under a ticket; the reply step takes it once, so answering the same message
twice is refused.

Conversations are kept in the store (unless LCKV_STORE=off), under the owner key the browser keeps
(history.py): page load binds the page to that key and restores the conversation it had open; a
conversation is saved from its first message on, and its session's recorder writes every change.
The side list's events act on the page's own conversation, or on one its owner's list holds: an
id from anywhere else reads as "no such conversation", whether it exists or not.
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
from app_support.history import (
    Binding,
    Exports,
    Pages,
    browser_secret,
    browser_value,
    choices,
    new_owner,
    read_browser_value,
)
from app_support.panel import latency_frame, metrics_markdown, read_metrics
from app_support.sessions import Edit, GenerationSlots, Message, PageState, Refused, SessionRegistry, forget_gradio_session
from lckv_stream import conversation_file
from lckv_stream.buckets import batch_class
from lckv_stream.chat import CacheSettings, ChatSession, PrefillProgress, TokenEvent, TurnEnd
from lckv_stream.chat_format import ChatError, ChatFormat, clean_message
from lckv_stream.conversation import CUT, Conversation, ConversationSettings, title_from_message
from lckv_stream.engine import Engine, EngineSettings
from lckv_stream.recording import StoreRecorder
from lckv_stream.store import ConversationNotFound, ConversationStore

NOTHING_CHANGED = "nothing changed"  # what session.configure says when the settings are the same
PLOT_EVERY_S = 0.5  # while a reply streams, the latency plot is redrawn at most this often
# ... and the page at most this often (10 times a second): a reader sees no difference, and the
# server builds and sends a view per redraw instead of per token.
STREAM_EVERY_S = 0.1
# The server builds every view (Gradio's postprocessing: a few ms of CPU each, the plot most), on
# the cores that decode. With many replies streaming at once, each is redrawn less often, so that
# the server's views stay at about this many a second in all.
VIEWS_PER_S = 20.0


def redraw_intervals(streaming: int) -> tuple[float, float]:
    """(page, plot) seconds between redraws of one streaming reply while `streaming` replies stream."""
    if STREAM_EVERY_S <= 0:
        return 0.0, PLOT_EVERY_S
    every = max(STREAM_EVERY_S, streaming / VIEWS_PER_S)
    return every, PLOT_EVERY_S * every / STREAM_EVERY_S


DEMO_TURNS = (5, 500)
NO_MESSAGE = "there is no message to answer: send one first (each message is answered once)"
NOT_SAVED = "conversations are not saved on this server (LCKV_STORE=off)"
NOT_OPENED = "this page has not opened yet: call /open first (with the browser state it returned before, if any)"
NOT_LISTED = "there is no such conversation in this browser's list"
TAKEN = ("Your previous conversation was opened in another tab or window and continues there; this "
         "message starts a new one (pick the other in the list to bring it back here).")
RELEASE_WAIT_S = 10.0  # how long opening a conversation waits for the page that had it to stop its reply

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

    def __init__(self, model, tokenizer, config: AppConfig, store: ConversationStore | None = None) -> None:
        """`store`: where conversations are kept (None: nowhere, LCKV_STORE=off)."""
        self.model = model
        self.tokenizer = tokenizer
        self.store = store
        self.pages = Pages()
        self.exports = Exports()
        # None without a store: Gradio draws a key per process, and nothing the browser keeps matters.
        self.browser_secret = browser_secret(store.path.parent) if store is not None else None
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
        shown: dict | None = None,
    ) -> tuple:
        """(chat, draft to put back, status, metrics table, latency plot, raw metrics, earlier
        messages button, latest messages button, Stop button).

        The chat is the page's window of the conversation (chat_view.py). `reply` is the partial
        reply while it streams (the engine fills the message at the end); `sent` a message Send
        accepted, shown before the reply step takes it; `draft` a message the engine did not keep:
        `restore_draft` puts it back in the message box. `plot=False` leaves the plot as shown: Gradio
        walks every value it sends. Stop shows while `running` (default: while the session generates).
        `shown`: what this stream's last view set the buttons to; they are sent only when that changes
        (Gradio builds a component for each button update it sends: milliseconds of the server's time).
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
        buttons = (earlier_label(first), first > 0, end < count, session.generating if running is None else running)
        if shown is not None and shown.get("buttons") == buttons:
            updates = (gr.skip(), gr.skip(), gr.skip())
        else:
            updates = (gr.update(value=buttons[0], visible=buttons[1]), gr.update(value=LATEST_LABEL, visible=buttons[2]),
                       gr.update(visible=buttons[3]))
            if shown is not None:
                shown["buttons"] = buttons
        return (
            messages,  # never skipped, so it can stay a plain value (see as_update)
            gr.skip() if draft is None else (next(self._drafts), draft),  # numbered: each one is a change
            status,
            metrics_markdown(numbers),
            as_update(latency_frame(session)) if plot else gr.skip(),
            numbers,
            *updates,
        )

    def notice(self, session: ChatSession, page: PageState, error: Exception | str, **view) -> tuple:
        """A problem as a toast and the status line (no error badges, nothing in the server log)."""
        gr.Warning(str(error))
        return self.view(session, page, f"⚠️ {error}", **view)

    def _lookup(self, request: gr.Request, conversation: Conversation | None = None) -> tuple[ChatSession, PageState, bool]:
        """The page's session and page state, and whether the session was just made; a new session
        of a page with a stored conversation open resumes it (`conversation`, or read from the store)."""
        session, created = self.registry.get(request.session_hash)
        if created:
            self._resume(request.session_hash, session, conversation)
        return session, self.registry.page(request.session_hash), created

    def _resume(self, key: str, session: ChatSession, conversation: Conversation | None) -> None:
        binding = self.pages.get(key)
        if self.store is None or binding is None or binding.conversation_id is None:
            return
        try:
            if conversation is None:
                conversation = self.store.load(binding.conversation_id, binding.owner)
            session.restore(conversation)
        except (ConversationNotFound, ChatError):  # deleted from another page meanwhile; or not one this app wrote
            self.pages.let_go(key)
            return
        session.recorder = StoreRecorder(self.store, conversation.id, binding.owner)

    # ---- page -----------------------------------------------------------------------------------
    def open(self, kept: object, request: gr.Request) -> tuple:
        """Page load: bind the page to the owner key the browser kept (a new one on a first visit) and
        show the conversation it had open, restored from the store.

        Returns the view, then (browser state, side list, system prompt, sink, window, export file).
        Over the API, pass the browser state this returned before (None the first time) to come back to it.
        """
        key = request.session_hash
        if self.store is None:
            session, page, _ = self._lookup(request)
            page.window.follow()
            return self._opened(self.view(session, page, f"Ready. Note: {NOT_SAVED}; a reload starts a new conversation."),
                                session, None)
        owner, current = read_browser_value(kept)
        self._release(key)  # a page opens once; an API client that opens again starts over
        binding = self.pages.bind(key, owner or new_owner())
        if current is not None and current not in self._owned(binding.owner):
            return self._show(request, binding, None, "The conversation this browser had open is not on this "
                              "server any more (deleted, or the server's disk was replaced); a new one starts here.")
        return self._show(request, binding, current, "Ready.")

    def close(self, request: gr.Request) -> None:
        """Tab closed: free the session at once, and Gradio's own state of it (the stored
        conversation stays)."""
        self.registry.drop(request.session_hash)
        self.pages.forget(request.session_hash)
        self.exports.discard(request.session_hash)
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

        Returns the view, the message box, the ticket the reply step answers, and (browser state,
        side list), updated when this message is the first of a conversation and saves it. A refused
        message stays in the box; the reply step then only repeats why.
        """
        session, page, created = self._lookup(request)
        binding = self.pages.get(request.session_hash)
        ticket = next(self._tickets)
        try:
            if session.generating:
                raise ChatError("a reply is still being written: wait for it or press Stop, then send")
            text = clean_message(message)
            change = self._configure(session, system_prompt, sink, window, seed)
        except ValueError as error:
            refused = self.notice(session, page, error)
            page.pending = Refused(ticket, refused[2])
            return refused + (inputs.box_text(message), ticket) + self._saved(None)
        page.pending = Message(ticket, text)
        page.window.follow()
        notes = []
        if binding is not None and binding.taken:
            binding.taken = False
            notes.append(TAKEN)
        if created and self.registry.was_evicted(request.session_hash):
            if binding is not None and binding.conversation_id is not None:
                notes.append(f"This conversation was idle for over {self.config.idle_minutes:g} minutes and its "
                             "memory was freed; it came back from the store, and its cache is read again from "
                             "the transcript.")
            else:
                notes.append(f"This conversation was idle for over {self.config.idle_minutes:g} minutes and was "
                             "closed to free memory; a new one starts here.")
        saved = self._record(request.session_hash, session, title_from_message(text))
        if change != NOTHING_CHANGED:
            notes.append(f"Settings: {change}.")
        if self.slots.full():
            notes.append(f"Busy: all {self.slots.limit} generation slots are in use; your message is queued "
                         "and is answered as soon as one frees up.")
        shown = self.view(session, page, " ".join(notes) or "Sending…", plot=False, running=True, sent=text)
        return shown + ("", ticket) + self._saved(binding if saved else None)

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
            self._record(request.session_hash, session)
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
        self._record(request.session_hash, session)  # the page saved it first (save_page); an API client may not
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

    # ---- saved conversations --------------------------------------------------------------------
    def switch(self, conversation_id: object, request: gr.Request) -> tuple:
        """Open another of this browser's conversations (the side list). Returns what `open` does."""
        session, page, _ = self._lookup(request)
        binding = self.pages.get(request.session_hash)
        try:
            self._check_can_change(session, binding, "switch")
            if not isinstance(conversation_id, str) or conversation_id not in self._owned(binding.owner):
                raise ChatError(NOT_LISTED)
        except ChatError as error:
            return self._opened(self.notice(session, page, error), session, binding)
        if conversation_id == binding.conversation_id:
            return self._opened(self.view(session, page, "This conversation is already open."), session, binding)
        self._release(request.session_hash)
        return self._show(request, binding, conversation_id, "Ready.")

    def new_conversation(self, request: gr.Request) -> tuple:
        """Start a new conversation; the open one stays in the list. Returns what `open` does."""
        session, page, _ = self._lookup(request)
        binding = self.pages.get(request.session_hash)
        try:
            self._check_can_change(session, binding, "start a new conversation")
        except ChatError as error:
            return self._opened(self.notice(session, page, error), session, binding)
        self._release(request.session_hash)
        self.pages.let_go(request.session_hash)
        return self._show(request, binding, None, "New conversation. It is saved with its first message.")

    def save_page(self, request: gr.Request) -> tuple:
        """Save the page's conversation if it is not yet (before the long-conversation demo runs in it);
        returns (browser state, side list)."""
        session, _, _ = self._lookup(request)
        binding = self.pages.get(request.session_hash)
        return self._saved(binding if self._record(request.session_hash, session) else None)

    def rename(self, title: object, request: gr.Request) -> tuple:
        """Rename the open conversation; returns (side list, title box, status)."""
        binding = self.pages.get(request.session_hash)
        try:
            if self.store is None:
                raise ChatError(NOT_SAVED)
            if binding is None:
                raise ChatError(NOT_OPENED)
            if binding.conversation_id is None:
                raise ChatError("this conversation is saved with its first message: send one, then name it")
            self.store.rename(binding.conversation_id, binding.owner, inputs.text("title", title))
        except (ValueError, ConversationNotFound) as error:
            gr.Warning(str(error))
            return self._saved(binding)[1], inputs.box_text(title), f"⚠️ {error}"
        return self._saved(binding)[1], "", "Renamed."

    def delete(self, confirmed: object, request: gr.Request) -> tuple:
        """Delete the open conversation from the store (the page asks first: `confirmed` must be
        true) and start a new one. Returns what `open` does."""
        session, page, _ = self._lookup(request)
        binding = self.pages.get(request.session_hash)
        try:
            self._check_can_change(session, binding, "delete it")
            if binding.conversation_id is None:
                raise ChatError("this conversation is not saved yet: there is nothing to delete")
        except ChatError as error:
            return self._opened(self.notice(session, page, error), session, binding)
        if confirmed is not True:
            return self._opened(self.view(session, page, "Not deleted."), session, binding)
        doomed = binding.conversation_id
        self._release(request.session_hash)
        self.exports.discard(request.session_hash)
        self.pages.let_go(request.session_hash)
        try:
            self.store.delete(doomed, binding.owner)
        except ConversationNotFound:  # deleted from another page already
            pass
        return self._show(request, binding, None, "Deleted. A new conversation starts here.")

    def export(self, request: gr.Request) -> tuple:
        """The open conversation as a conversation file (JSON) to download; returns (file, status)."""
        session, page, _ = self._lookup(request)
        binding = self.pages.get(request.session_hash)
        hidden = gr.update(value=None, visible=False)
        if session.generating:
            return hidden, self._warn("a reply is still being written: wait for it or press Stop, then export")
        if self.store is not None and binding is not None and binding.conversation_id is not None:
            conversation = self.store.load(binding.conversation_id, binding.owner)
        elif session.message_count:
            conversation = session.to_conversation(self._title(session))
        else:
            return hidden, self._warn("there is nothing to export yet: send a message first")
        path = self.exports.write(request.session_hash, conversation.title, conversation_file.dumps(conversation))
        return (gr.update(value=str(path), visible=True),
                f"Exported {_count(len(conversation.messages), 'message')} as {path.name}: download it below the list.")

    def import_file(self, upload: object, request: gr.Request) -> tuple:
        """A conversation file (an export) as a new conversation of this browser, opened in the page;
        a file that is not acceptable is a notice and nothing is written. Returns what `open` does."""
        session, page, _ = self._lookup(request)
        binding = self.pages.get(request.session_hash)
        path = upload.get("path") if isinstance(upload, dict) else None
        try:
            if session.generating:
                raise ChatError("a reply is still being written: wait for it or press Stop, then import")
            if self.store is not None and binding is None:
                raise ChatError(NOT_OPENED)
            if not isinstance(path, str):
                raise ChatError("choose a conversation file (.json, as Export writes it) to import")
            conversation = conversation_file.load_path(path, len(self.tokenizer))
            cache = conversation.settings.cache
            try:
                inputs.cache(cache.sink, cache.window)  # the page's ranges, not only what the cache accepts
                ChatSession(self.model, self.tokenizer, engine=self.engine).restore(conversation)
            except ValueError as error:
                raise conversation_file.ConversationFileError(f"the file's conversation cannot be opened here: {error}") from None
        except ValueError as error:
            return self._opened(self.notice(session, page, f"Not imported: {error}"), session, binding)
        lead = (f"Imported “{conversation.title}”: {_count(len(conversation.messages), 'message')} "
                f"({_count(conversation.turns, 'turn')})")
        self._release(request.session_hash)
        if self.store is None:
            session, page, _ = self._lookup(request)
            session.restore(conversation)
            page.window.follow()
            status = restored_note(conversation, lead) if conversation.messages else f"{lead}."
            return self._opened(self.view(session, page, f"{status} Not saved on this server."), session, None, changed=True)
        conversation_id = self.store.insert(conversation, binding.owner)
        return self._show(request, binding, conversation_id, f"{lead}.", lead)

    def _check_can_change(self, session: ChatSession, binding: Binding | None, action: str) -> None:
        """Raises ChatError when the page cannot change which conversation it has open now."""
        if self.store is None:
            raise ChatError(NOT_SAVED)
        if binding is None:
            raise ChatError(NOT_OPENED)
        if session.generating:
            raise ChatError(f"a reply is still being written: wait for it or press Stop, then {action}")

    def _show(
        self, request: gr.Request, binding: Binding, conversation_id: str | None, status: str, lead: str | None = None,
    ) -> tuple:
        """Open `conversation_id` (one the owner's list holds; None: a new one) in the page, whose
        session was released: what `open` returns.
        `status` is the status line for a new or empty conversation, `lead` the start of it for a
        restored one (see restored_note)."""
        key = request.session_hash
        conversation, binding.taken = None, False  # the page chose what it shows now
        if conversation_id is not None:
            previous = self.pages.hold(key, conversation_id)
            if previous is not None:
                self._release(previous)  # the other page's reply ends and is written before it is read here
            try:
                conversation = self.store.load(conversation_id, binding.owner)
            except ConversationNotFound:  # deleted from another page meanwhile
                self.pages.let_go(key)
                status = "That conversation was deleted meanwhile; a new one starts here."
        session, page, _ = self._lookup(request, conversation)
        page.window.follow()
        if conversation is not None and conversation.messages:
            status = restored_note(conversation, lead)
        return self._opened(self.view(session, page, status), session, binding, changed=True)

    def _release(self, key: str) -> None:
        """Free page `key`'s session, after its reply (if one streams) has stopped and been written."""
        session = self.registry.peek(key)
        if session is None:
            return
        if session.generating:
            self.registry.stop(key)
            deadline = time.monotonic() + RELEASE_WAIT_S
            while session.generating and time.monotonic() < deadline:
                time.sleep(0.02)
        session.recorder = None  # whatever it still does is not this conversation's any more
        self.registry.drop(key)

    def _record(self, key: str, session: ChatSession, title: str | None = None) -> bool:
        """Save the page's conversation in the store from now on, if it is not yet; True when it was
        saved now (the browser state and the side list then change). `title`: its first message's."""
        binding = self.pages.get(key)
        if self.store is None or binding is None or binding.conversation_id is not None:
            return False
        if session.message_count:  # messages the session already holds are saved with it
            conversation_id = self.store.insert(session.to_conversation(self._title(session)), binding.owner)
        else:
            conversation_id = self.store.create(
                binding.owner, ConversationSettings(session.cache_settings, session.sampling), session.system_prompt, title)
        self.pages.hold(key, conversation_id)
        session.recorder = StoreRecorder(self.store, conversation_id, binding.owner)
        return True

    def _owned(self, owner: str) -> set[str]:
        return {summary.id for summary in self.store.list(owner)}

    def _opened(self, shown: tuple, session: ChatSession, binding: Binding | None, changed: bool = False) -> tuple:
        """`shown` (a view) and the rest of what open and the side list's events return: (browser state,
        side list, system prompt, sink, window, export file), the file hidden when the conversation changed."""
        export = gr.update(value=None, visible=False) if changed else gr.skip()
        return shown + self._saved(binding) + self._settings(session) + (export,)

    def _saved(self, binding: Binding | None) -> tuple:
        """(browser state, side list) for `binding`; both left as shown for None."""
        if self.store is None or binding is None:
            return gr.skip(), gr.skip()
        listed = choices(self.store.list(binding.owner))
        return gr.update(value=browser_value(binding)), gr.update(choices=listed, value=binding.conversation_id)

    @staticmethod
    def _settings(session: ChatSession) -> tuple:
        """The settings controls as the session has them (system prompt, sink, window): the page sends
        them with every message, so they must show the open conversation's."""
        cache = session.cache_settings
        return gr.update(value=session.system_prompt or ""), gr.update(value=cache.sink), gr.update(value=cache.window)

    @staticmethod
    def _title(session: ChatSession) -> str:
        first = session.message_slice(0, 1)
        return title_from_message(first[0]["content"]) if first else "New conversation"

    @staticmethod
    def _warn(error: str) -> str:
        gr.Warning(error)
        return f"⚠️ {error}"

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
        shown = float("-inf")  # and is shown at once
        buttons: dict = {}  # what the stream's views set the buttons to
        try:
            with self.slots.hold():
                for event in events:
                    if isinstance(event, PrefillProgress):
                        progress((event.done, event.total), desc="Reading your message", unit="tokens")
                        yield self.view(session, page, f"{label}Reading your message: {event.done:,} / {event.total:,} "
                                        "tokens (the cache keeps the pinned start and the latest window).",
                                        plot=False, running=True, shown=buttons)
                    elif isinstance(event, TokenEvent):
                        reply += event.text
                        now = time.monotonic()
                        every, plot_every = redraw_intervals(self.slots.active)
                        if now - shown < every:
                            continue  # shown with a later token, or with the turn's end
                        shown = now
                        replot = now - plotted >= plot_every
                        plotted = now if replot else plotted
                        yield self.view(session, page, f"{label}Streaming… {event.index + 1} tokens", reply=reply,
                                        plot=replot, running=True, shown=buttons)
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


def restored_note(conversation: Conversation, lead: str | None = None) -> str:
    """The status line for a conversation brought back from the store or a file (with messages);
    `lead` replaces its start."""
    note = lead or f"Restored {_count(len(conversation.messages), 'message')} ({_count(conversation.turns, 'turn')}) from the store"
    if conversation.messages[-1].status == CUT:
        note += "; the last reply was cut off when the server stopped while writing it (what was written is kept)"
    return note + ". Its cache is read again from the transcript at your next message."


def _count(number: int, noun: str) -> str:
    return f"{number:,} {noun}{'' if number == 1 else 's'}"
