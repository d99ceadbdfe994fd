"""Gradio app: chat with an LCKV model through a sink + window cache and watch its memory stay flat.

UI wiring only: the layout and which handler each event calls. The handlers are in
app_support/handlers.py; every number on screen is read from the engine.

Environment (all optional): LCKV_MODEL ('default', 'tiny-random', a folder, a .gguf, a Hub id),
LCKV_DEVICE, LCKV_IDLE_MINUTES, LCKV_MAX_GENERATIONS, LCKV_QUEUE_SIZE, LCKV_SINK, LCKV_WINDOW,
LCKV_MAX_NEW_TOKENS, LCKV_STORE (off: conversations are not saved), LCKV_DATA_DIR (where they are);
GRADIO_SERVER_NAME / GRADIO_SERVER_PORT as usual (default 127.0.0.1:7860).
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
from typing import Sequence

import gradio as gr

from app_support.app_config import AppConfig
from app_support.chat_view import LATEST_LABEL
from app_support.handlers import DEMO_TURNS, SCRIPT, ChatApp
from app_support.panel import PLOT_COLUMNS
from app_support.tiny import NAME as TINY_RANDOM
from app_support.tiny import tiny_random_model
from lckv_stream.limits import LIMITS
from lckv_stream.memory import freeze_startup_objects
from lckv_stream.metrics import device_name
from lckv_stream.sampling import SamplingSettings
from lckv_stream.store import StoreError, open_store

EXAMPLES = SCRIPT[:4]

DESCRIPTION = (
    "The cache keeps a few **sink** tokens (the system prompt is pinned there) plus a **window** of the "
    "most recent tokens, and only some layers store keys and values (LCKV), so memory stays flat however "
    "long the chat grows."
)
SAVED = ("Kept on this server under a random key that only this browser holds: a reload or a restart "
         "brings them back. Another browser sees its own; Export and Import move one between them.")
NOT_SAVED = ("Conversations are **not saved** on this server (LCKV_STORE=off): a reload or a restart starts "
             "a new one. Export keeps the open one as a file; Import opens one.")
# The page asks before Delete; over the API, /delete takes true.
CONFIRM_DELETE = "(confirmed) => confirm('Delete this conversation? It cannot be brought back.')"


def load(config: AppConfig):
    """(model, tokenizer) for config.model; 'tiny-random' is a small random model for tests."""
    device = None if config.device == "auto" else config.device
    if config.model == TINY_RANDOM:
        return tiny_random_model(device or "cpu")
    from lckv_stream.loading import load_model

    return load_model(config.model, device)


def build_demo(app: ChatApp) -> gr.Blocks:
    """The page and its events; generation events share one concurrency cap."""
    config, defaults = app.config, SamplingSettings()
    # Gradio's preprocessing is off for every event: each handler checks the raw values it gets
    # (app_support/inputs.py), so a bad one gets a clear notice instead of an opaque error.
    generation = dict(concurrency_limit=config.max_generations, concurrency_id="generation", preprocess=False)
    quick = dict(concurrency_limit=None, preprocess=False)
    hidden = dict(api_visibility="undocumented")
    saved = app.store is not None
    # Exported and uploaded conversation files leave Gradio's cache within two hours.
    with gr.Blocks(title="lckv-stream", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(f"# lckv-stream\nModel **{config.model}** on **{device_name(app.model.device)}**. {DESCRIPTION}")
        # The owner key and the open conversation's id, in localStorage; a fixed storage key and a
        # secret kept beside the store, so that they read the same after a restart.
        browser = gr.BrowserState(None, storage_key="lckv-stream", secret=app.browser_secret)
        with gr.Sidebar(label="Conversations", elem_id="history"):
            gr.Markdown(f"### Conversations\n{SAVED if saved else NOT_SAVED}")
            new_button = gr.Button("New conversation", size="sm", variant="primary", elem_id="new-conversation",
                                   visible=saved)
            conversations = gr.Radio([], label="This browser's conversations", elem_id="conversations", visible=saved)
            with gr.Row(visible=saved):
                title = gr.Textbox(placeholder="A new title for this one", show_label=False, lines=1, max_lines=1,
                                   scale=3, elem_id="title")
                rename_button = gr.Button("Rename", size="sm", scale=1, min_width=60)
            with gr.Row():
                export_button = gr.Button("Export", size="sm", min_width=60, elem_id="export")
                import_button = gr.UploadButton("Import", file_types=[".json"], size="sm", min_width=60,
                                                elem_id="import")
                delete_button = gr.Button("Delete", size="sm", variant="stop", min_width=60, elem_id="delete",
                                          visible=saved)
            export_file = gr.File(label="Exported conversation (JSON)", visible=False, interactive=False,
                                  elem_id="export-file")
            confirmed = gr.Checkbox(visible=False)  # what the page's confirm() answered
        with gr.Row():
            with gr.Column(scale=3):
                earlier_button = gr.Button(visible=False, size="sm", elem_id="earlier")
                chatbot = gr.Chatbot(
                    label="Conversation", height=460, elem_id="chat", editable="user",
                    examples=[{"text": text} for text in EXAMPLES],
                    placeholder="Type a message below, or pick an example. In a long conversation the latest "
                                "messages show here and earlier ones on demand; edit one of yours to take "
                                "the conversation back to it.",
                )
                latest_button = gr.Button(LATEST_LABEL, visible=False, size="sm", elem_id="latest")
                message = gr.Textbox(
                    label="Message", placeholder="Type a message and press Enter", lines=1, max_lines=8,
                    elem_id="message",
                )
                with gr.Row():
                    send_button = gr.Button("Send", variant="primary", size="sm", min_width=80, elem_id="send")
                    stop_button = gr.Button("Stop", variant="stop", size="sm", min_width=80, elem_id="stop",
                                            visible=False)
                    regenerate_button = gr.Button("Regenerate", size="sm", min_width=80)
                    undo_button = gr.Button("Undo", size="sm", min_width=80)
                    clear_button = gr.Button("Clear", size="sm", min_width=80)
                status = gr.Markdown("Loading…", label="status", elem_id="status")
            with gr.Column(scale=2):
                panel = gr.Markdown(label="metrics", elem_id="metrics")
                plot = gr.LinePlot(
                    x=PLOT_COLUMNS[0], y=PLOT_COLUMNS[1], title="Per-token latency over the conversation",
                    x_title="token", y_title="ms (a long history: mean per point)", height=240, label="latency",
                    show_label=False, elem_id="latency",
                )
                with gr.Accordion("Raw numbers (JSON)", open=False):
                    raw = gr.JSON(label="raw_metrics", elem_id="raw-metrics")
        with gr.Accordion("Settings (cache and seed changes apply at your next message)", open=True):
            system_prompt = gr.Textbox(label="System prompt (optional, pinned in the sink tokens)", lines=2)
            with gr.Row():
                sink = gr.Slider(*LIMITS["sink"], value=config.sink, step=1, precision=0, label="Sink tokens")
                window = gr.Slider(*LIMITS["window"], value=config.window, step=16, precision=0, label="Window tokens")
                # A text box: a number box sends 0 when left empty, which would give every
                # conversation the same seed.
                seed = gr.Textbox(
                    value="", label="Seed", elem_id="seed", placeholder="random", max_lines=1,
                    info="Empty: each conversation draws its own. A number: the same messages get the same replies.",
                )
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
                demo_turns = gr.Slider(*DEMO_TURNS, value=50, step=5, precision=0, label="Turns")
                demo_button = gr.Button("Run long conversation", elem_id="long-conversation")

        ticket = gr.State(None)  # what the reply step answers: the ticket of the last message sent
        lost_draft = gr.State(None)  # (number, text) of a message the engine did not keep
        view = [chatbot, lost_draft, status, panel, plot, raw, earlier_button, latest_button, stop_button]
        sampling = [max_new_tokens, temperature, top_p]
        settings = [system_prompt, sink, window, seed]
        stored = [browser, conversations]
        # Opening a conversation sets the settings controls to its own: they go with every message.
        opened = view + stored + [system_prompt, sink, window, export_file]
        send = dict(fn=app.send, inputs=[message] + settings, outputs=view + [message, ticket] + stored, **quick)
        reply = dict(fn=app.respond, inputs=[ticket] + sampling, outputs=view, **generation)

        demo.load(app.open, browser, opened, api_name="open", **quick)
        demo.unload(app.close)
        conversations.input(app.switch, conversations, opened, api_name="switch", **quick)
        new_button.click(app.new_conversation, None, opened, api_name="new_conversation", **quick)
        gr.on([title.submit, rename_button.click], app.rename, title, [conversations, title, status],
              api_name="rename", **quick)
        delete_button.click(app.delete, confirmed, opened, js=CONFIRM_DELETE, api_name="delete", **quick)
        export_button.click(app.export, None, [export_file, status], api_name="export", **quick)
        import_button.upload(app.import_file, import_button, opened, api_name="import", **quick)
        lost_draft.change(app.restore_draft, lost_draft, message, api_name="restore_draft", **quick)
        gr.on([message.submit, send_button.click], api_name="send", **send).then(api_name="respond", **reply)
        chatbot.example_select(app.example, None, message, **quick, **hidden).then(**send, **hidden).then(
            **reply, **hidden)
        chatbot.edit(app.edit, None, view + [ticket], **quick, **hidden).then(**reply, **hidden)
        gr.on(
            [system_prompt.submit, system_prompt.blur, sink.release, window.release, seed.submit, seed.blur],
            app.configure, settings, settings_note, api_name="configure", **quick,
        )
        stop_button.click(app.stop, None, None, api_name="stop", **quick)
        gr.on([regenerate_button.click, chatbot.retry], app.regenerate, sampling, view, api_name="regenerate",
              **generation)
        gr.on([undo_button.click, chatbot.undo], app.undo, None, view, api_name="undo", **quick)
        # The chat's own trash icon clears the conversation too, not only what the page shows.
        gr.on([clear_button.click, chatbot.clear], app.clear, None, view, api_name="clear", **quick)
        earlier_button.click(app.earlier, None, view, api_name="earlier", **quick)
        latest_button.click(app.latest, None, view, api_name="latest", **quick)
        demo_button.click(app.save_page, None, stored, **quick, **hidden).then(
            app.long_conversation, [demo_turns] + sampling, view, api_name="long_conversation", **generation)
    demo.queue(max_size=config.queue_size)
    app.blocks = demo
    return demo


def create_app(config: AppConfig) -> tuple[ChatApp, gr.Blocks]:
    """Open the conversation store, load the model and build the page; starts the idle-session reaper.

    Raises ValueError when the store cannot be opened (before the model loads, which takes longer).
    """
    try:
        store = open_store(config.store_environ())
    except (OSError, sqlite3.Error, StoreError) as error:
        raise ValueError(f"cannot open the conversation store: {error} (set LCKV_DATA_DIR to a writable "
                         "folder, or LCKV_STORE=off)") from None
    model, tokenizer = load(config)
    app = ChatApp(model, tokenizer, config, store)
    app.registry.start_reaper(every_seconds=min(60.0, app.registry.idle_seconds / 2))
    demo = build_demo(app)
    freeze_startup_objects()  # so that collecting garbage later does not stall the decoding
    return app, demo


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
