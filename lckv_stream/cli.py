"""Command line: `lckv-stream chat|fetch-base|convert` (or `python -m lckv_stream ...`)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from .chat_format import ChatError
from .chat import CacheSettings, ChatSession, PrefillProgress, SessionStats, TokenEvent, TurnEnd
from .metrics import TurnMetrics
from .sampling import SamplingSettings

HELP = "commands: /undo  /regen  /clear  /stats  /quit   (Ctrl-C stops a reply)"


def footer(turn: TurnMetrics, stats: SessionStats) -> str:
    """One line of stats after each reply."""
    cache = stats.cache
    return (
        f"[ttft {turn.ttft_ms:.0f} ms | {turn.decode_ms_per_token:.1f} ms/token | {turn.tokens_per_s:.1f} tok/s"
        f" | cache {cache.allocated_mb:.2f} MB (fixed) vs dense {stats.dense_bytes / 2**20:.2f} MB (grows)"
        f" | held {cache.tokens_held}/{stats.conversation_tokens} tokens | {stats.decoder}]"
    )


def stream_reply(session: ChatSession, events, out=sys.stdout) -> None:
    """Print a streamed reply; Ctrl-C stops it cleanly."""
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


def run_chat(args: argparse.Namespace) -> int:
    from .loading import ModelLoadError, load_model

    try:
        settings = SamplingSettings(args.temperature, args.top_p, args.top_k, args.repetition_penalty, args.max_new_tokens)
        cache = CacheSettings(args.sink, args.window)
        model, tokenizer = load_model(args.model, args.device, layer_types=args.layer_types)
    except (ValueError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    session = ChatSession(model, tokenizer, args.system, cache, settings)
    print(f"{args.model} on {model.device} | {HELP}")
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        command = line.strip()
        try:
            if command in ("/quit", "/exit"):
                return 0
            if command == "/undo":
                session.undo()
                print("[last exchange removed]")
            elif command == "/clear":
                session.clear()
                print("[new conversation]")
            elif command == "/stats":
                print(session.stats())
            elif command == "/regen":
                stream_reply(session, session.regenerate())
            else:
                stream_reply(session, session.send(line))
        except ChatError as error:
            print(f"[{error}]")


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lckv-stream", description="LCKV + StreamingLLM chat (also `python -m lckv_stream`)")
    commands = parser.add_subparsers(dest="command", required=True)
    chat = commands.add_parser("chat", help="chat in the terminal")
    chat.add_argument("--model", default="default", help="'default', a folder, a .gguf file or a Hub id")
    chat.add_argument("--layer-types", help="layer map for converting a plain Llama model")
    chat.add_argument("--device", default="auto")
    chat.add_argument("--system", help="system prompt (pinned in the sinks)")
    chat.add_argument("--sink", type=int, default=4)
    chat.add_argument("--window", type=int, default=1024)
    defaults = SamplingSettings()
    chat.add_argument("--temperature", type=float, default=defaults.temperature)
    chat.add_argument("--top-p", type=float, default=defaults.top_p)
    chat.add_argument("--top-k", type=int, default=defaults.top_k)
    chat.add_argument("--repetition-penalty", type=float, default=defaults.repetition_penalty)
    chat.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
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
