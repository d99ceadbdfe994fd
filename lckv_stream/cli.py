"""Command line: `lckv-stream chat|fetch-base|convert` (or `python -m lckv_stream ...`).

The arguments are checked before torch and transformers load (seconds), so a bad flag or value is
refused at once; settings take the same ranges as the web page (`limits.py`).
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Sequence

from . import limits

if TYPE_CHECKING:
    from .chat import ChatSession, SessionStats
    from .metrics import TurnMetrics

COMMANDS = {
    "/undo": "remove your last message and its reply",
    "/regen": "a new reply to your last message",
    "/clear": "start a new conversation",
    "/stats": "the cache, the conversation and the last reply's speed",
    "/save": "/save FILE: write this conversation to a file",
    "/load": "/load FILE: take up a conversation from a file",
    "/help": "this list",
    "/quit": "leave (also /exit, Ctrl-D)",
}
ALIASES = {"/exit": "/quit"}
CLI_OWNER = "terminal"  # the store's owner of conversations held in the terminal
HELP = "commands: " + "  ".join(COMMANDS) + "   (Ctrl-C stops a reply; // sends a message that starts with /)"


def command_help() -> str:
    """The commands, one a line."""
    return "\n".join(f"  {name:<7} {what}" for name, what in COMMANDS.items()) + (
        "\n  Ctrl-C stops a reply; start a message with // to send one that begins with /")


def parse_line(line: str) -> tuple[str | None, str]:
    """(command, message) for a line typed at the prompt: a known command, ("unknown", the word)
    for a word after "/" that is no command, or (None, the message to send)."""
    text = line.strip()
    if text.startswith("//"):
        return None, line.lstrip()[1:]
    word = text.split(maxsplit=1)[0] if text else ""
    word = ALIASES.get(word, word)
    if word in COMMANDS:
        return word, text.split(maxsplit=1)[1].strip() if " " in text else ""
    if len(word) > 1 and word[0] == "/" and word[1].isalpha():
        return "unknown", word
    return None, line


def footer(turn: TurnMetrics, stats: SessionStats) -> str:
    """One line of stats after each reply."""
    cache = stats.cache
    return (
        f"[ttft {turn.ttft_ms:.0f} ms | {turn.decode_ms_per_token:.1f} ms/token | {turn.tokens_per_s:.1f} tok/s"
        f" | cache {cache.allocated_mb:.2f} MB (fixed) vs dense {stats.dense_bytes / 2**20:.2f} MB (grows)"
        f" | held {cache.tokens_held}/{stats.conversation_tokens} tokens | {stats.decoder}]"
    )


def stats_text(stats: SessionStats, turn: TurnMetrics | None) -> str:
    """What /stats prints: a few labelled lines."""
    cache = stats.cache
    sink = f"sink {cache.sink} + window {cache.window}"
    if cache.sink > stats.sink_setting:
        sink += (f"; the sink is {stats.sink_setting} raised to {cache.sink}: the pinned start (system prompt"
                 " and chat template header) stays in the cache")
    lines = [
        f"conversation   {stats.turns:,} turn{'' if stats.turns == 1 else 's'}, {stats.conversation_tokens:,} tokens",
        f"cache holds    {cache.tokens_held:,} tokens ({sink})",
        f"KV cache       {cache.allocated_mb:.2f} MB allocated once ({cache.used_mb:.2f} MB in use), "
        f"{cache.kv_layers} of {cache.total_layers} layers store KV",
        f"dense cache    {stats.dense_bytes / 2**20:.2f} MB for the same conversation (grows with it)",
        f"decoder        {stats.decoder}",
        f"seed           {'random, one per conversation' if stats.seed is None else stats.seed}",
    ]
    if turn is not None:
        lines.append(f"last reply     {turn.new_tokens} tokens ({turn.stop_reason}), first token after "
                     f"{turn.ttft_ms:,.0f} ms, {turn.decode_ms_per_token:.1f} ms/token ({turn.tokens_per_s:.1f} tokens/s)")
    return "\n".join(lines)


def stream_reply(session: ChatSession, events, out=sys.stdout) -> None:
    """Print a streamed reply; Ctrl-C stops it cleanly."""
    from .chat import PrefillProgress, TokenEvent, TurnEnd

    try:
        for event in events:
            if isinstance(event, PrefillProgress):
                out.write(f"\r(reading {event.done}/{event.total} tokens)")
            elif isinstance(event, TokenEvent):
                out.write(event.text)
            elif isinstance(event, TurnEnd):
                out.write("\n" + footer(event.metrics, session.stats()) + "\n")
            out.flush()
    except KeyboardInterrupt:
        events.close()  # the session finalizes the partial reply; the cache stays consistent
        out.write("\n[stopped]\n")


def run_command(session: ChatSession, command: str, argument: str, out=sys.stdout) -> None:
    """Carry out one prompt command (not /quit, /load); ChatError for one that cannot be done now."""
    from .chat_format import ChatError

    if command == "unknown":
        out.write(f"[unknown command {argument}]\n{command_help()}\n")
    elif command == "/help":
        out.write(command_help() + "\n")
    elif command == "/undo":
        session.undo()
        out.write("[last exchange removed]\n")
    elif command == "/clear":
        session.clear()
        out.write("[new conversation]\n")
    elif command == "/stats":
        out.write(stats_text(session.stats(), session.metrics.last_turn) + "\n")
    elif command == "/regen":
        stream_reply(session, session.regenerate(), out)
    elif command == "/save":
        if not argument:
            raise ChatError("/save needs a file name: /save FILE")
        session.save(argument)
        out.write(f"[saved to {argument}]\n")


def run_chat(args: argparse.Namespace) -> int:
    from .chat import CacheSettings, ChatSession
    from .chat_format import ChatError
    from .loading import ModelLoadError, load_model
    from .sampling import SamplingSettings

    try:
        settings = SamplingSettings(args.temperature, args.top_p, args.top_k, args.repetition_penalty, args.max_new_tokens)
        cache = CacheSettings(args.sink, args.window)
        model, tokenizer = load_model(args.model, args.device, layer_types=args.layer_types)
    except (ValueError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        session, where = _open_conversation(args, model, tokenizer, cache, settings)
    except (ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{args.model} on {model.device} | {where} | {HELP}")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        command, argument = parse_line(line)
        try:
            if command == "/quit":
                return 0
            if command == "/load":
                session = _load_file(argument, model, tokenizer, session)
                print(f"[loaded {len(session.messages)} messages]")
            elif command is not None:
                run_command(session, command, argument)
            elif line.strip():
                stream_reply(session, session.send(argument))
        except ChatError as error:
            print(f"[{error}]")


def _open_conversation(args, model, tokenizer, cache, settings) -> tuple[ChatSession, str]:
    """The session, recorded in the conversation store unless LCKV_STORE=off; `--resume ID` takes
    up a stored conversation. Returns it and a line saying where it is kept."""
    from .chat import ChatSession
    from .conversation import ConversationSettings
    from .recording import StoreRecorder
    from .store import ConversationNotFound, open_store

    store = open_store()
    if store is None:
        if args.resume:
            raise ValueError("--resume needs the conversation store (LCKV_STORE is off)")
        return ChatSession(model, tokenizer, args.system, cache, settings, seed=args.seed), "not saved (LCKV_STORE=off)"
    if args.resume:
        try:
            stored = store.load(args.resume, CLI_OWNER)
        except ConversationNotFound:
            raise ValueError(f"no conversation {args.resume!r} in {store.path}") from None
        session = ChatSession(model, tokenizer, recorder=StoreRecorder(store, args.resume, CLI_OWNER))
        session.restore(stored)
        return session, f"resumed {args.resume} ({len(stored.messages)} messages)"
    conversation_id = store.create(CLI_OWNER, ConversationSettings(cache, settings), args.system)
    session = ChatSession(model, tokenizer, args.system, cache, settings, seed=args.seed,
                          recorder=StoreRecorder(store, conversation_id, CLI_OWNER))
    return session, f"saved as {conversation_id} (--resume {conversation_id})"


def _load_file(path: str, model, tokenizer, current: ChatSession) -> ChatSession:
    """A session resuming a conversation file (recorded as a new stored conversation when the
    current one is recorded); ChatError with the file's problem otherwise."""
    from .chat import ChatSession
    from .chat_format import ChatError
    from .conversation_file import ConversationFileError
    from .recording import StoreRecorder

    if not path:
        raise ChatError("/load needs a file name: /load FILE")
    try:
        session = ChatSession.load(path, model, tokenizer)
    except (ConversationFileError, OSError) as error:
        raise ChatError(f"could not load {path}: {error}") from None
    recorder = current.recorder
    if recorder is not None:
        conversation_id = recorder.store.insert(session.to_conversation(title=f"Imported from {path}"), CLI_OWNER)
        session.recorder = StoreRecorder(recorder.store, conversation_id, CLI_OWNER)
    current.close()
    return session


def run_fetch_base(args: argparse.Namespace) -> int:
    from .base_model import BaseModelError, load_base

    try:
        load_base("cpu")
    except BaseModelError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("base model ready")
    return 0


def run_convert(args: argparse.Namespace) -> int:
    from .loading import ModelLoadError, load_model

    try:
        model, tokenizer = load_model(args.llama, "cpu", layer_types=args.layer_types)
    except (ValueError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"saved {model.config.layer_types} -> {args.out}")
    return 0


def setting(name: str):
    """An argparse `type=` for setting `name`: its range from limits.py, said when refused."""
    def convert(text: str):
        try:
            return limits.parse(name, text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from None

    convert.__name__ = name
    return convert


def build_parser() -> argparse.ArgumentParser:
    """Every command and flag; settings take their defaults and ranges from limits.py."""
    parser = argparse.ArgumentParser(prog="lckv-stream", description="LCKV + StreamingLLM chat (also `python -m lckv_stream`)")
    commands = parser.add_subparsers(dest="command", required=True)
    chat = commands.add_parser("chat", help="chat in the terminal")
    chat.add_argument("--model", default="default", help="'default', a folder, a .gguf file or a Hub id")
    chat.add_argument("--layer-types", help="layer map for converting a plain Llama model")
    chat.add_argument("--device", default="auto")
    chat.add_argument("--system", help="system prompt (pinned in the sinks)")
    chat.add_argument("--resume", metavar="ID", help="take up a stored conversation (its id is printed at start)")
    for name in ("sink", "window", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens"):
        low, high = limits.LIMITS[name]
        chat.add_argument(f"--{name.replace('_', '-')}", type=setting(name), default=limits.DEFAULTS[name],
                          help=f"{limits.DEFAULTS[name]} by default ({low:g} to {high:g})")
    chat.add_argument("--seed", type=setting("seed"), default=None,
                      help="fix the random stream of replies (the same messages get the same replies); "
                           "default: a random one")
    chat.set_defaults(run=run_chat)
    fetch = commands.add_parser("fetch-base", help="download and prepare the base model once")
    fetch.set_defaults(run=run_fetch_base)
    convert = commands.add_parser("convert", help="convert a Llama checkpoint to LCKV")
    convert.add_argument("--llama", required=True, help="Llama folder, .gguf file or Hub id")
    convert.add_argument("--layer-types", required=True)
    convert.add_argument("--out", required=True)
    convert.set_defaults(run=run_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
