"""Gradio app: chat with an LCKV model through a sink + window cache and watch its memory stay flat.

UI only. Every number on screen is read from the engine (`ChatSession.stats()`, `session.metrics`,
`lckv_stream.metrics`); app_support/ holds the per-browser session registry and the panel formatting.

Environment (all optional): LCKV_MODEL ('default', 'tiny-random', a folder, a .gguf, a Hub id),
LCKV_DEVICE, LCKV_IDLE_MINUTES, LCKV_MAX_GENERATIONS, LCKV_QUEUE_SIZE, LCKV_SINK, LCKV_WINDOW,
LCKV_MAX_NEW_TOKENS; GRADIO_SERVER_NAME / GRADIO_SERVER_PORT as usual (default 127.0.0.1:7860).
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from dataclasses import dataclass, fields, replace
from typing import Iterator, Mapping, Sequence

import gradio as gr

from app_support.panel import PLOT_COLUMNS, latency_frame, metrics_markdown, read_metrics
from app_support.sessions import GenerationSlots, SessionRegistry
from app_support.tiny import NAME as TINY_RANDOM
from app_support.tiny import tiny_random_model
from lckv_stream.buckets import batch_class
from lckv_stream.chat_format import ChatError, ChatFormat, clean_message
from lckv_stream.engine import Engine, EngineSettings
from lckv_stream.chat import MAX_WINDOW, CacheSettings, ChatSession, PrefillProgress, TokenEvent, TurnEnd
from lckv_stream.metrics import device_name
from lckv_stream.sampling import LIMITS, SamplingSettings

SINK_RANGE = (0, 64)
WINDOW_RANGE = (16, min(8192, MAX_WINDOW))
PLOT_EVERY_S = 0.5  # while a reply streams, the latency plot is redrawn at most this often
NOTHING_CHANGED = "nothing changed"  # what session.configure says when the settings are the same

END_NOTES = {
    "eos": "the model finished its answer",
    "max_new_tokens": "reached the max new tokens setting",
    "stopped": "stopped",
    "stopped_while_reading": "stopped while reading your message: it was not kept, and it is back in the box",
}

# Scripted user turns for the long-conversation demo, cycled.
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

DESCRIPTION = (
    "Each browser session has its own conversation. The cache keeps a few **sink** tokens (the system "
    "prompt is pinned there) plus a **window** of the most recent tokens, and only some layers store "
    "keys and values (LCKV), so memory stays flat however long the chat grows."
)


@dataclass(frozen=True)
class AppConfig:
    """Settings read from the environment (LCKV_<NAME>) and the command line."""

    model: str = "default"
    device: str = "auto"
    idle_minutes: float = 30.0
    max_generations: int = 0  # 0: the device's default batch (64 on a GPU, 8 on CPU)
    queue_size: int = 32
    sink: int = 4
    window: int = 1024
    max_new_tokens: int = 256

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ, **overrides) -> AppConfig:
        """Config from LCKV_* variables; a bad value raises ValueError naming the variable."""
        values = {}
        for spec in fields(cls):
            raw = environ.get(f"LCKV_{spec.name.upper()}")
            if raw is None:
                continue
            kind = {"str": str, "int": int, "float": float}[spec.type]
            try:
                values[spec.name] = kind(raw)
            except ValueError:
                raise ValueError(f"LCKV_{spec.name.upper()} must be {spec.type}, got {raw!r}") from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        config = cls(**values)
        config.validate()
        return config

    def validate(self) -> None:
        CacheSettings(self.sink, self.window)
        SamplingSettings(max_new_tokens=self.max_new_tokens)
        if self.idle_minutes <= 0 or self.queue_size < 1:
            raise ValueError("LCKV_IDLE_MINUTES and LCKV_QUEUE_SIZE must be positive")
        if not 0 <= self.max_generations <= 64:
            raise ValueError(f"LCKV_MAX_GENERATIONS must be between 1 and 64 (0: the device's default), got {self.max_generations}")


def load(config: AppConfig):
    """(model, tokenizer) for config.model; 'tiny-random' is a small random model for tests."""
    device = None if config.device == "auto" else config.device
    if config.model == TINY_RANDOM:
        return tiny_random_model(device or "cpu")
    from lckv_stream.loading import load_model

    return load_model(config.model, device)


class ChatApp:
    """The event handlers: each looks up the caller's own ChatSession by Gradio's session hash."""

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
        self._drafts = itertools.count()

    # ---- views --------------------------------------------------------------------------------
    def metrics(self, session: ChatSession) -> dict:
        return read_metrics(session, self.model.device, len(self.registry), self.engine.stats())

    def view(
        self, session: ChatSession, status: str, reply: str | None = None, draft: str | None = None,
        plot: bool = True,
    ) -> tuple:
        """(chat, draft to put back, status, metrics table, latency plot, raw metrics).

        `reply` is the partial reply while it streams (the engine fills the message at the end);
        `draft` is a message the engine did not keep, e.g. after an error: `restore_draft` puts it back
        in the message box. `plot=False` leaves the plot as shown: Gradio walks every value it sends,
        so a long latency history costs time on each update.
        """
        messages = session.messages
        if reply is not None:
            messages[-1]["content"] = reply
        numbers = self.metrics(session)
        return (
            messages,  # never skipped, so it can stay a plain value (see as_update)
            gr.skip() if draft is None else (next(self._drafts), draft),  # numbered: each one is a change
            status,
            metrics_markdown(numbers),
            as_update(latency_frame(session)) if plot else gr.skip(),
            numbers,
        )

    # ---- handlers -----------------------------------------------------------------------------
    def open(self, request: gr.Request) -> tuple:
        """Page load: create this browser's session and show its (empty) state."""
        session, _ = self.registry.get(request.session_hash)
        return self.view(session, "Ready.")

    def close(self, request: gr.Request) -> None:
        """Tab closed: free the session at once."""
        self.registry.drop(request.session_hash)

    def restore_draft(self, draft: tuple[int, str] | None) -> str:
        """Put a message the engine did not keep back in the message box (the page calls it when one is set)."""
        if draft is None:
            raise gr.Error("there is no message to put back")
        return draft[1]

    def configure(self, system_prompt: str, sink: int, window: int, request: gr.Request) -> str:
        """Apply settings to the next turn; the note under the settings says what the engine will change."""
        session, _ = self.registry.get(request.session_hash)
        try:
            change = self._configure(session, system_prompt, sink, window)
        except ValueError as error:
            gr.Warning(str(error))
            return f"⚠️ Settings not applied: {error}"
        return "Settings unchanged." if change == NOTHING_CHANGED else f"Settings: {change}."

    def send(
        self, message: str, history: list, system_prompt: str, sink: int, window: int, request: gr.Request
    ) -> tuple:
        """Check the message and settings, show the message at once; the reply streams in `respond`.

        Raises gr.Error (the message stays in the box and no reply starts) when something is wrong.
        """
        session, created = self.registry.get(request.session_hash)
        try:
            text = clean_message(message)
            change = self._configure(session, system_prompt, sink, window)
        except ValueError as error:
            raise gr.Error(str(error)) from None
        notes = []
        if created and history:
            notes.append(f"This conversation was idle for over {self.config.idle_minutes:g} minutes and was "
                         "closed to free memory; a new one starts here.")
        if change != NOTHING_CHANGED:
            notes.append(f"Settings: {change}.")
        if self.slots.full():
            notes.append(f"Busy: all {self.slots.limit} generation slots are in use; your message is queued "
                         "and is answered as soon as one frees up.")
        chat = session.messages + [{"role": "user", "content": text}]
        return chat, "", text, " ".join(notes) or "Sending…"

    def respond(
        self, pending: str | None, max_new_tokens: int, temperature: float, top_p: float,
        request: gr.Request, progress: gr.Progress = gr.Progress(),
    ) -> Iterator[tuple]:
        """Stream the reply to the message `send` accepted."""
        session, _ = self.registry.get(request.session_hash)
        if pending is None:
            raise gr.Error("there is no message to answer: send one first")
        try:
            events = session.send(pending, self._sampling(max_new_tokens, temperature, top_p))
        except ValueError as error:
            gr.Warning(str(error))
            yield self.view(session, f"⚠️ {error}", draft=pending)
            return
        yield from self._stream(session, events, progress, draft=pending)

    def regenerate(
        self, max_new_tokens: int, temperature: float, top_p: float,
        request: gr.Request, progress: gr.Progress = gr.Progress(),
    ) -> Iterator[tuple]:
        """Replace the last reply with a new one."""
        session, _ = self.registry.get(request.session_hash)
        try:
            events = session.regenerate(self._sampling(max_new_tokens, temperature, top_p))
        except ValueError as error:
            gr.Warning(str(error))
            yield self.view(session, f"⚠️ {error}")
            return
        yield from self._stream(session, events, progress)

    def long_conversation(
        self, turns: int, max_new_tokens: int, temperature: float, top_p: float,
        request: gr.Request, progress: gr.Progress = gr.Progress(),
    ) -> Iterator[tuple]:
        """Drive `turns` scripted user turns through this session; Stop ends the run."""
        key = request.session_hash
        session, _ = self.registry.get(key)
        halt = self.registry.halt_event(key)
        halt.clear()
        try:
            sampling = self._sampling(max_new_tokens, temperature, top_p)
        except ValueError as error:
            gr.Warning(str(error))
            yield self.view(session, f"⚠️ {error}")
            return
        before = self.metrics(session)
        for turn in range(turns):
            if halt.is_set():
                yield self.view(session, f"Long conversation stopped after {turn} of {turns} turns.")
                return
            try:
                events = session.send(SCRIPT[turn % len(SCRIPT)], sampling)
            except ValueError as error:
                gr.Warning(str(error))
                yield self.view(session, f"⚠️ {error}")
                return
            end = yield from self._stream(session, events, progress, label=f"Long conversation, turn {turn + 1}/{turns}: ")
            if end is None:
                return
        after = self.metrics(session)
        yield self.view(session, f"Long conversation done: {turns} turns. Conversation {before['conversation_tokens']:,}"
                                 f" → {after['conversation_tokens']:,} tokens; KV cache {before['cache_mb']:.2f} → "
                                 f"{after['cache_mb']:.2f} MB.")

    def stop(self, request: gr.Request) -> None:
        """Stop this session's reply after the current token (or prompt chunk); its own last update says so.

        A toast, not the status line: this event can finish after the reply's final update and would
        then cover it.
        """
        if self.registry.stop(request.session_hash):
            gr.Info("Stopping after the current token…")

    def undo(self, request: gr.Request) -> tuple:
        return self._edit(request, "undo", "Removed the last message and its reply.")

    def clear(self, request: gr.Request) -> tuple:
        return self._edit(request, "clear", "New conversation.")

    # ---- helpers ------------------------------------------------------------------------------
    def _configure(self, session: ChatSession, system_prompt: str, sink: int, window: int) -> str:
        """session.configure with the UI's values (sliders bound them; Gradio makes them whole).

        Raises ValueError (ChatError included) for a bad value, or while a reply streams.
        """
        return session.configure(system_prompt=system_prompt or None, cache_settings=CacheSettings(sink, window))

    def _sampling(self, max_new_tokens: int, temperature: float, top_p: float) -> SamplingSettings:
        return SamplingSettings(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens)

    def _edit(self, request: gr.Request, action: str, done: str) -> tuple:
        session, _ = self.registry.get(request.session_hash)
        try:
            getattr(session, action)()
        except ChatError as error:
            gr.Warning(str(error))
            return self.view(session, f"⚠️ {error}")
        return self.view(session, done)

    def _stream(
        self, session: ChatSession, events, progress: gr.Progress, draft: str | None = None, label: str = ""
    ) -> Iterator[tuple]:
        """Relay engine events as views; returns the TurnEnd, or None when the engine refused the turn.

        On a ChatError (busy, out of memory) the engine has already dropped the turn; the user's
        message goes back into the box. If the page stops listening, closing `events` ends the turn.
        """
        reply = ""
        plotted = float("-inf")  # the first token redraws the plot
        try:
            with self.slots.hold():
                for event in events:
                    if isinstance(event, PrefillProgress):
                        progress((event.done, event.total), desc="Reading your message", unit="tokens")
                        yield self.view(session, f"{label}Reading your message: {event.done:,} / {event.total:,} "
                                                 "tokens (the cache keeps the pinned start and the latest window).",
                                                 plot=False)
                    elif isinstance(event, TokenEvent):
                        reply += event.text
                        replot = time.monotonic() - plotted >= PLOT_EVERY_S
                        plotted = time.monotonic() if replot else plotted
                        yield self.view(session, f"{label}Streaming… {event.index + 1} tokens", reply=reply, plot=replot)
                    elif isinstance(event, TurnEnd):
                        lost = event.reason == "stopped_while_reading"
                        note = f"{label}Done: {event.metrics.new_tokens} tokens, {END_NOTES[event.reason]}."
                        yield self.view(session, note, draft=draft if lost else None)
                        return event
        except ChatError as error:
            gr.Warning(str(error))
            yield self.view(session, f"⚠️ {error}", draft=draft)
        finally:
            events.close()
        return None


def as_update(value) -> dict:
    """`value` as a Gradio update, for an output that other updates skip (the latency plot).

    A gr.skip() makes Gradio 6.31 replace the session's copy of the component, and the next plain
    value then adds a config for that copy, value included, and keeps it: a plot and a chat per
    turn grew the server 20% over 500 turns. A value sent as an update replaces the config in
    place. An input (the message box) must get no skips at all: reading it adds the config too.
    """
    return gr.update(value=value)


def build_demo(app: ChatApp) -> gr.Blocks:
    """The page and its events; generation events share one concurrency cap."""
    config, defaults = app.config, SamplingSettings()
    generation = dict(concurrency_limit=config.max_generations, concurrency_id="generation")
    quick = dict(concurrency_limit=None)
    with gr.Blocks(title="lckv-stream") as demo:
        gr.Markdown(f"# lckv-stream\nModel **{config.model}** on **{device_name(app.model.device)}**. {DESCRIPTION}")
        with gr.Row():
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", height=460, elem_id="chat")
                message = gr.Textbox(
                    label="Message", placeholder="Type a message and press Enter", lines=1, max_lines=8,
                    elem_id="message",
                )
                with gr.Row():
                    send_button = gr.Button("Send", variant="primary", size="sm", min_width=80, elem_id="send")
                    stop_button = gr.Button("Stop", variant="stop", size="sm", min_width=80, elem_id="stop")
                    regenerate_button = gr.Button("Regenerate", size="sm", min_width=80)
                    undo_button = gr.Button("Undo", size="sm", min_width=80)
                    clear_button = gr.Button("Clear", size="sm", min_width=80)
                status = gr.Markdown("Loading…", label="status", elem_id="status")
            with gr.Column(scale=2):
                panel = gr.Markdown(label="metrics", elem_id="metrics")
                plot = gr.LinePlot(
                    x=PLOT_COLUMNS[0], y=PLOT_COLUMNS[1], title="Per-token latency, whole conversation",
                    x_title="token", y_title="ms", height=240, label="latency", show_label=False, elem_id="latency",
                )
                with gr.Accordion("Raw numbers (JSON)", open=False):
                    raw = gr.JSON(label="raw_metrics", elem_id="raw-metrics")
        with gr.Accordion("Settings (cache changes apply at your next message)", open=True):
            system_prompt = gr.Textbox(label="System prompt (optional, pinned in the sink tokens)", lines=2)
            with gr.Row():
                sink = gr.Slider(*SINK_RANGE, value=config.sink, step=1, precision=0, label="Sink tokens")
                window = gr.Slider(*WINDOW_RANGE, value=config.window, step=16, precision=0, label="Window tokens")
            with gr.Row():
                max_new_tokens = gr.Slider(
                    *LIMITS["max_new_tokens"], value=config.max_new_tokens, step=1, precision=0, label="Max new tokens"
                )
                temperature = gr.Slider(*LIMITS["temperature"], value=defaults.temperature, step=0.05, label="Temperature")
                top_p = gr.Slider(*LIMITS["top_p"], value=defaults.top_p, step=0.05, label="Top-p")
            settings_note = gr.Markdown(elem_id="settings-note")
        with gr.Accordion("Long conversation demo", open=False):
            gr.Markdown("Runs scripted user turns through your session, so you can watch the tokens in the "
                        "conversation grow while the cache memory stays flat. Stop ends it.")
            with gr.Row():
                demo_turns = gr.Slider(5, 500, value=50, step=5, precision=0, label="Turns")
                demo_button = gr.Button("Run long conversation", elem_id="long-conversation")

        pending = gr.State(None)
        lost_draft = gr.State(None)  # (number, text) of a message the engine did not keep
        view = [chatbot, lost_draft, status, panel, plot, raw]
        sampling = [max_new_tokens, temperature, top_p]
        cache_inputs = [system_prompt, sink, window]

        demo.load(app.open, None, view, api_name="open", **quick)
        demo.unload(app.close)
        lost_draft.change(app.restore_draft, lost_draft, message, api_name="restore_draft", **quick)
        gr.on(
            [message.submit, send_button.click], app.send, [message, chatbot] + cache_inputs,
            [chatbot, message, pending, status], api_name="send", **quick,
        ).success(app.respond, [pending] + sampling, view, api_name="respond", **generation)
        gr.on(
            [system_prompt.submit, system_prompt.blur, sink.release, window.release], app.configure,
            cache_inputs, settings_note, api_name="configure", **quick,
        )
        stop_button.click(app.stop, None, None, api_name="stop", **quick)
        regenerate_button.click(app.regenerate, sampling, view, api_name="regenerate", **generation)
        undo_button.click(app.undo, None, view, api_name="undo", **quick)
        clear_button.click(app.clear, None, view, api_name="clear", **quick)
        demo_button.click(app.long_conversation, [demo_turns] + sampling, view, api_name="long_conversation", **generation)
    demo.queue(max_size=config.queue_size)
    return demo


def create_app(config: AppConfig) -> tuple[ChatApp, gr.Blocks]:
    """Load the model and build the page; starts the idle-session reaper."""
    model, tokenizer = load(config)
    app = ChatApp(model, tokenizer, config)
    app.registry.start_reaper(every_seconds=min(60.0, app.registry.idle_seconds / 2))
    return app, build_demo(app)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="lckv-stream chat UI (host/port: GRADIO_SERVER_NAME/PORT)")
    parser.add_argument("--model", help="overrides LCKV_MODEL: 'default', 'tiny-random', a folder, a .gguf, a Hub id")
    args = parser.parse_args(argv)
    try:
        _, demo = create_app(AppConfig.from_env(model=args.model))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    demo.launch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
