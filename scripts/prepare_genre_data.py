#!/usr/bin/env python3
"""Build the broad held-out evaluation set and the training prose of more genres (see genre_sources.py).

Outputs:
  --eval-out (default data/broad_eval, committed; small)
    <genre>.txt.xz      for fiction, nonfiction, conversation, technical: the first documents of each
                        evaluation package that make at least EVAL_TOKENS tokens
    debian-handbook.txt.xz  the first documents of .data/heldout.txt (the model card's held-out split)
    manifest.json, SOURCES.md   packages, versions, licences, characters, tokens, 13-gram overlaps
  --train-out (default .data/genres, not committed)
    <genre>.txt.xz      narrative, news, conversation, faq: every document of the training packages
    SOURCES.md
  --sample-out (default data/train_sample, committed)
    <genre>.txt.xz      the first documents of each training genre (about SAMPLE_CHARS characters),
                        which the tests check against the evaluation set

Documents are separated by a line "<|doc|>", as in prepare_text_data.py. Paragraphs are de-duplicated
across the training genres, and the evaluation drops any paragraph that occurs in training (the
existing --train text and the new genres). The 13-gram overlap of every evaluation genre with every
training source, and with teacher chats when --chats is given, is computed and written down.

    python scripts/prepare_text_data.py --out .data          # train.txt.xz and heldout.txt first
    python scripts/prepare_genre_data.py --eval-out data/broad_eval --train-out .data/genres
"""

from __future__ import annotations

import argparse
import json
import lzma
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from genre_sources import EVAL_SOURCES, TRAIN_GENRE_SOURCES, Source, open_source, read_xz_docs  # noqa: E402
from prepare_text_data import XZ_PRESET, dedupe_docs, join_docs, overlaps, par_key, take_chars  # noqa: E402

WINDOW = 1024
EVAL_TOKENS = 42 * WINDOW          # the evaluation reads 40 windows; two spare
HANDBOOK_TOKENS = 65 * WINDOW      # the model card's windows 0-63, one spare
NGRAM = 13
SAMPLE_CHARS = 20_000


def count_tokens(tokenizer, docs: list[str]) -> list[int]:
    """Tokens of each document as the evaluation encodes it (the text, then one <|endoftext|>)."""
    return [len(ids) + 1 for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]]


def first_docs(tokenizer, docs: list[str], tokens: int) -> tuple[list[str], int]:
    """The first documents whose tokens add up to at least `tokens` (tokenized 64 at a time)."""
    kept, total = [], 0
    for start in range(0, len(docs), 64):
        for doc, n in zip(docs[start : start + 64], count_tokens(tokenizer, docs[start : start + 64])):
            kept.append(doc)
            total += n
            if total >= tokens:
                return kept, total
    raise RuntimeError(f"only {total} tokens, {tokens} needed")


def write_docs(path: Path, docs: list[str]) -> int:
    path.write_bytes(lzma.compress(join_docs(docs).encode("utf-8"), preset=XZ_PRESET))
    return path.stat().st_size


def sources_table(rows: list[dict]) -> list[str]:
    lines = ["| genre | package | version | licence | documents | characters | tokens |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['genre']} | {r['package']} | {r['version']} | {r['licence'].replace('|', '/')} | "
                     f"{r['documents']:,} | {r['chars']:,} | {r['tokens']:,} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--eval-out", type=Path, default=Path("data/broad_eval"))
    ap.add_argument("--train-out", type=Path, default=Path(".data/genres"))
    ap.add_argument("--sample-out", type=Path, default=Path("data/train_sample"))
    ap.add_argument("--train", type=Path, default=Path(".data/train.txt.xz"), help="prepare_text_data.py's train split")
    ap.add_argument("--heldout", type=Path, default=Path(".data/heldout.txt"), help="prepare_text_data.py's held-out split")
    ap.add_argument("--chats", type=Path, help="teacher chats (.jsonl from sample_teacher_chats.py) to check for overlap")
    ap.add_argument("--cache", type=Path, default=Path(".cache/debian-debs"))
    ap.add_argument("--wheels", type=Path, default=Path(".cache/wheels"))
    args = ap.parse_args(argv)
    from lckv_stream.base_model import load_base

    _, tokenizer = load_base("cpu")
    for folder in (args.eval_out, args.train_out, args.sample_out, args.cache, args.wheels):
        folder.mkdir(parents=True, exist_ok=True)
    old_train = read_xz_docs(args.train)
    seen = {par_key(p) for doc in old_train for p in doc.split("\n\n")}
    train_rows, eval_rows = [], []
    train_text: dict[str, list[str]] = {}
    eval_text: dict[str, list[str]] = {}

    with tempfile.TemporaryDirectory(prefix="genre_data_") as tmp:
        def extract(source: Source):
            pkg = open_source(source, args.cache, args.wheels, Path(tmp))
            docs = source.extract(pkg)
            shutil.rmtree(pkg.root)
            return pkg, docs

        for source in TRAIN_GENRE_SOURCES:
            pkg, docs = extract(source)
            docs = dedupe_docs(docs, seen)
            train_text.setdefault(source.genre, []).extend(docs)
            train_rows.append({"genre": source.genre, "package": source.package, "version": pkg.version,
                               "licence": pkg.licence, "note": source.note, "documents": len(docs),
                               "chars": sum(map(len, docs)), "tokens": sum(count_tokens(tokenizer, docs))})
            print(f"train {source.genre:12s} {source.package:24s} {len(docs):6d} docs {train_rows[-1]['tokens']:>9,} tokens",
                  flush=True)

        for genre, source in EVAL_SOURCES.items():
            pkg, docs = extract(source)
            docs = dedupe_docs(docs, set(seen))  # drops what training has; eval genres stay independent
            docs, tokens = first_docs(tokenizer, docs, EVAL_TOKENS)
            eval_text[genre] = docs
            eval_rows.append({"genre": genre, "package": source.package, "version": pkg.version, "licence": pkg.licence,
                              "note": source.note, "documents": len(docs), "chars": sum(map(len, docs)), "tokens": tokens})
            print(f"eval  {genre:12s} {source.package:24s} {len(docs):6d} docs {tokens:>9,} tokens", flush=True)

    handbook, tokens = first_docs(tokenizer, read_xz_docs(args.heldout), HANDBOOK_TOKENS)
    eval_text["debian-handbook"] = handbook
    eval_rows.append({"genre": "debian-handbook", "package": "debian-handbook (prepare_text_data.py heldout)",
                      "version": "see .data/SOURCES.md", "licence": "GPL-2+ or CC-BY-SA-3.0",
                      "note": "the model card's held-out split", "documents": len(handbook),
                      "chars": sum(map(len, handbook)), "tokens": tokens})

    print(f"{NGRAM}-gram overlaps ...", flush=True)
    probes = {genre: "\n".join(docs) for genre, docs in eval_text.items()}
    references = {"train (prepare_text_data.py)": "\n".join(old_train)}
    references.update({f"train genre {g}": "\n".join(d) for g, d in train_text.items()})
    if args.chats:
        chats = [json.loads(line)["text"] for line in args.chats.read_text().splitlines() if line.strip()]
        references["teacher chats"] = "\n".join(chats)
    overlap = {name: overlaps(probes, text, NGRAM) for name, text in references.items()}
    between = {a: overlaps({b: probes[b] for b in probes if b != a}, probes[a], NGRAM) for a in probes}

    for genre, docs in train_text.items():
        write_docs(args.train_out / f"{genre}.txt.xz", docs)
        write_docs(args.sample_out / f"{genre}.txt.xz", take_chars(docs, SAMPLE_CHARS))
    for genre, docs in eval_text.items():
        write_docs(args.eval_out / f"{genre}.txt.xz", docs)
    manifest = {"window": WINDOW, "ngram": NGRAM, "eval": eval_rows, "train_genres": train_rows,
                "overlap_eval_with_train": overlap, "overlap_between_eval_genres": between}
    (args.eval_out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")

    overlap_lines = [f"| {ref} | " + " | ".join(f"{overlap[ref][g]:.4%}" for g in probes) + " |" for ref in overlap]
    header = ["| training source | " + " | ".join(probes) + " |", "|---" * (len(probes) + 1) + "|"]
    common = ["", f"## {NGRAM}-gram overlap (share of each evaluation genre's word {NGRAM}-grams found in training)", ""]
    common += header + overlap_lines
    eval_md = ["# Broad evaluation set", "", "Built by `scripts/prepare_genre_data.py`; each file holds documents "
               "separated by a `<|doc|>` line. Tokens: SmolLM2 tokenizer, one `<|endoftext|>` after each document.", ""]
    eval_md += sources_table(eval_rows) + [""] + [f"- {r['genre']}: {r['note']}" for r in eval_rows] + common + [""]
    (args.eval_out / "SOURCES.md").write_text("\n".join(eval_md))
    train_md = ["# Training prose of more genres", "", "Built by `scripts/prepare_genre_data.py`; no package is "
                "shared with the evaluation set.", ""]
    train_md += sources_table(train_rows) + [""] + [f"- {r['package']}: {r['note']}" for r in train_rows] + common + [""]
    (args.train_out / "SOURCES.md").write_text("\n".join(train_md))
    print("\n".join(header + overlap_lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
