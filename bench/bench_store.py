"""The conversation store on disk: time to open a long conversation, write cost per turn, bytes per turn.

Each conversation is written the way the app writes it: the user message committed with its tokens
and template text, then the reply streamed through a ReplyWriter (a flush every 32 tokens) and
finished. Token ids are random in a 49,152-token vocabulary (SmolLM2's). Two kinds of turn:
  short: a 6-word message (about 19 tokens with its template) and a 12-token reply, 31 tokens a turn
         (the 5,000-turn soak in RESULTS.md averaged 22);
  long:  a 30-word message (about 48 tokens) and a 250-token reply, 298 tokens a turn.
"open + load" is a new ConversationStore on the file plus `load` of the whole conversation, median
of 5; the file size is after a checkpoint; "payload" is the bytes of the messages themselves (text,
template text, 2 bytes a token id).

    python bench/bench_store.py [--turns 100 1000 5000] [--dir DIR]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lckv_stream.conversation import COMPLETE  # noqa: E402
from lckv_stream.store import ConversationStore  # noqa: E402

VOCAB = 49152
WORDS = "the cache keeps a few sink tokens and a window of recent ones so memory stays flat".split()
PROFILES = {"short": (6, 12), "long": (30, 250)}  # (words in a user message, tokens in a reply)
OWNER = "bench-browser-key"


def sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def write_turns(store: ConversationStore, conversation_id: str, turns: int, profile: str, rng: random.Random) -> None:
    user_words, reply_tokens = PROFILES[profile]
    for _ in range(turns):
        text = sentence(rng, user_words)
        template = f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
        ids = [rng.randrange(VOCAB) for _ in range(len(template) // 4)]
        store.append_message(conversation_id, OWNER, "user", text, ids, segment_text=template)
        writer = store.begin_reply(conversation_id, OWNER, flush_tokens=32, flush_seconds=0.5)
        for _ in range(reply_tokens):
            writer.add(rng.randrange(VOCAB), rng.choice(WORDS) + " ")
        writer.finish(COMPLETE)


def measure(directory: Path, turns: int, profile: str) -> dict:
    path = directory / f"{profile}-{turns}.sqlite3"
    rng = random.Random(turns)
    with ConversationStore(path) as store:
        conversation_id = store.create(OWNER)
        begin = time.perf_counter()
        write_turns(store, conversation_id, turns, profile, rng)
        write_s = time.perf_counter() - begin
        store.checkpoint()
        size = store.file_bytes()
    opens, loaded = [], None
    for _ in range(5):
        begin = time.perf_counter()
        with ConversationStore(path) as store:
            loaded = store.load(conversation_id, OWNER)
        opens.append((time.perf_counter() - begin) * 1e3)
    tokens = len(loaded.transcript)
    # What the messages hold: text, template text, 2 bytes a token id (the vocabulary is under 65,536).
    payload = sum(len(m.content.encode()) + len((m.segment_text or "").encode()) + 2 * len(m.tokens) for m in loaded.messages)
    return {
        "profile": profile, "turns": turns, "messages": len(loaded.messages), "tokens": tokens,
        "write_ms_per_turn": write_s * 1e3 / turns, "open_ms": statistics.median(opens),
        "file_mb": size / 2**20, "bytes_per_turn": size / turns, "payload_per_turn": payload / turns,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, nargs="+", default=[100, 1000, 5000])
    parser.add_argument("--dir", type=Path, help="where the store files go (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        directory = args.dir or Path(scratch)
        directory.mkdir(parents=True, exist_ok=True)
        rows = [measure(directory, turns, profile) for profile in PROFILES for turns in args.turns]
    print(f"| kind | turns | messages | tokens | write ms/turn | open + load ms | file MB | bytes/turn | of which payload |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['profile']} | {r['turns']:,} | {r['messages']:,} | {r['tokens']:,} | {r['write_ms_per_turn']:.2f} |"
            f" {r['open_ms']:.1f} | {r['file_mb']:.2f} | {r['bytes_per_turn']:,.0f} | {r['payload_per_turn']:,.0f} |"
        )


if __name__ == "__main__":
    main()
