"""Tokenize the text corpora of `scripts/prepare_text_data.py` with the base model's tokenizer.

Writes uint16 token arrays (the vocabulary has 49152 entries):
  train.npy    plain documents separated by <|endoftext|>, a share of them wrapped as a chat turn
  heldout.npy  held-out documents (never trained on), for perplexity
  stream.npy   one long text, for streaming perplexity

With --genres (the training prose of `prepare_genre_data.py`), train.npy mixes those genres in with
the documentation and dictionaries (shuffled with --seed); conversations ('A:'/'B:' lines) become
ChatML chats, A the user and B the assistant. mix.json records documents and tokens per genre.

    python scripts/tokenize_corpora.py --text .data --out /tmp/lckv-data
    python scripts/tokenize_corpora.py --text .data --genres .data/genres --out /tmp/lckv-data
"""

from __future__ import annotations

import argparse
import json
import lzma
import random
from pathlib import Path

import numpy as np

from lckv_stream.base_model import load_base

DOC_SEPARATOR = "<|doc|>"
CHAT_SHARE = 0.35
QUESTIONS = [
    "Tell me about {head}.",
    "What does this mean: {head}?",
    "Can you explain {head}?",
    "Write a short passage that starts with: {head}",
    "I'd like to learn something. Start with \"{head}\".",
]


def read_documents(path: Path) -> list[str]:
    opener = lzma.open if path.suffix == ".xz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        text = handle.read()
    return [doc.strip() for doc in text.split(DOC_SEPARATOR) if doc.strip()]


def as_chat(tokenizer, doc: str, rng: random.Random) -> str:
    """Wrap a document as an assistant answer, so the student also sees the chat format."""
    head = " ".join(doc.split()[:5]).rstrip(".,;:")
    question = rng.choice(QUESTIONS).format(head=head)
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": doc}]
    return tokenizer.apply_chat_template(messages, tokenize=False)


def encode_documents(tokenizer, docs: list[str], chat_share: float, seed: int) -> np.ndarray:
    rng = random.Random(seed)
    separator = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    texts = [as_chat(tokenizer, doc, rng) if rng.random() < chat_share else doc for doc in docs]
    ids: list[int] = []
    for start in range(0, len(texts), 2048):
        for encoded in tokenizer(texts[start : start + 2048], add_special_tokens=False)["input_ids"]:
            ids.extend(encoded)
            ids.append(separator)
    return np.asarray(ids, dtype=np.uint16)


BASE_GENRE = "documentation and dictionaries"  # prepare_text_data.py's train split


def dialogue_as_chat(tokenizer, doc: str) -> str:
    """A conversation of 'A: ...' / 'B: ...' lines as a ChatML chat (A: user, B: assistant)."""
    messages: list[dict] = []
    for line in doc.splitlines():
        speaker, _, text = line.partition(": ")
        role = "user" if speaker == "A" else "assistant"
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + text
        else:
            messages.append({"role": role, "content": text})
    return tokenizer.apply_chat_template(messages, tokenize=False)


def encode_mix(tokenizer, labelled: list[tuple[str, str]], chat_share: float, seed: int) -> tuple[np.ndarray, dict]:
    """Token ids of (genre, document) pairs in a seeded shuffle, and documents / tokens per genre."""
    rng = random.Random(seed)
    labelled = list(labelled)
    rng.shuffle(labelled)
    separator = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    texts = []
    for genre, doc in labelled:
        if genre == "conversation":
            texts.append(dialogue_as_chat(tokenizer, doc))
        else:
            texts.append(as_chat(tokenizer, doc, rng) if rng.random() < chat_share else doc)
    ids: list[int] = []
    counts: dict[str, dict[str, int]] = {}
    for start in range(0, len(texts), 2048):
        encoded = tokenizer(texts[start : start + 2048], add_special_tokens=False)["input_ids"]
        for (genre, _), tokens in zip(labelled[start : start + 2048], encoded):
            ids.extend(tokens)
            ids.append(separator)
            entry = counts.setdefault(genre, {"documents": 0, "tokens": 0})
            entry["documents"] += 1
            entry["tokens"] += len(tokens) + 1
    return np.asarray(ids, dtype=np.uint16), counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, default=Path(".data"))
    parser.add_argument("--out", type=Path, default=Path("/tmp/lckv-data"))
    parser.add_argument("--genres", type=Path, help="folder of <genre>.txt.xz files to mix into train.npy")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    _, tokenizer = load_base("cpu")
    args.out.mkdir(parents=True, exist_ok=True)
    plan = [("train", "train.txt.xz", CHAT_SHARE), ("heldout", "heldout.txt", 0.0), ("stream", "stream.txt.xz", 0.0)]
    if args.genres:
        labelled = [(BASE_GENRE, doc) for doc in read_documents(args.text / "train.txt.xz")]
        for path in sorted(args.genres.glob("*.txt.xz")):
            labelled += [(path.name.removesuffix(".txt.xz"), doc) for doc in read_documents(path)]
        tokens, counts = encode_mix(tokenizer, labelled, CHAT_SHARE, args.seed)
        np.save(args.out / "train.npy", tokens)
        (args.out / "mix.json").write_text(json.dumps({"tokens": len(tokens), "genres": counts}, indent=1) + "\n")
        print(f"train: {len(labelled)} documents, {len(tokens):,} tokens: "
              + ", ".join(f"{g} {c['tokens']:,}" for g, c in counts.items()))
        plan = plan[1:]
    for name, filename, share in plan:
        docs = read_documents(args.text / filename)
        tokens = encode_documents(tokenizer, docs, share, args.seed)
        np.save(args.out / f"{name}.npy", tokens)
        print(f"{name}: {len(docs)} documents, {len(tokens):,} tokens")


if __name__ == "__main__":
    main()
