"""The broad evaluation set and the training genres: disjoint packages, no shared text, enough tokens."""

import json
import lzma
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import genre_sources  # noqa: E402
import prepare_text_data  # noqa: E402
from genre_sources import EVAL_SOURCES, TRAIN_GENRE_SOURCES, chapters, chat_lines, gutenberg_body, read_xz_docs  # noqa: E402
from prepare_text_data import dedupe_docs, overlaps  # noqa: E402

EVAL_DIR = ROOT / "data/broad_eval"
SAMPLE_DIR = ROOT / "data/train_sample"
MANIFEST = json.loads((EVAL_DIR / "manifest.json").read_text())


def test_evaluation_packages_are_used_nowhere_in_training():
    evaluation = {s.name for s in EVAL_SOURCES.values()}
    training = {s.name for s in TRAIN_GENRE_SOURCES} | set(prepare_text_data.TRAIN_SOURCES)
    elsewhere = set(prepare_text_data.HELDOUT_SOURCES) | set(prepare_text_data.STREAM_SOURCES)
    assert not evaluation & training
    assert not evaluation & elsewhere
    assert not {s.name for s in TRAIN_GENRE_SOURCES} & elsewhere
    assert "Pride and Prejudice" in genre_sources.STREAM_BOOKS  # the streaming text's novel stays out of training


def test_the_evaluation_has_four_genres_of_at_least_40k_tokens_plus_the_handbook():
    rows = {r["genre"]: r for r in MANIFEST["eval"]}
    assert {"fiction", "nonfiction", "conversation", "technical", "debian-handbook"} <= set(rows)
    for genre, row in rows.items():
        assert row["tokens"] >= 40 * MANIFEST["window"] + 1, genre
        assert row["licence"] and row["version"], genre
        assert len(read_xz_docs(EVAL_DIR / f"{genre}.txt.xz")) == row["documents"], genre
    assert rows["debian-handbook"]["tokens"] >= 64 * MANIFEST["window"] + 1


def test_recorded_13_gram_overlap_with_all_training_text_is_below_a_tenth_of_a_percent():
    assert MANIFEST["ngram"] == 13
    sources = MANIFEST["overlap_eval_with_train"]
    assert "train (prepare_text_data.py)" in sources and len(sources) >= 5
    for source, per_genre in sources.items():
        for genre, share in per_genre.items():
            assert share < 0.001, (source, genre, share)


def test_the_committed_training_sample_shares_no_13_gram_with_the_evaluation():
    samples = {p.name.removesuffix(".txt.xz"): "\n".join(read_xz_docs(p)) for p in sorted(SAMPLE_DIR.glob("*.txt.xz"))}
    assert {"narrative", "news", "conversation", "faq"} <= set(samples)
    with lzma.open(SAMPLE_DIR / "teacher_chats.jsonl.xz", "rt", encoding="utf-8") as handle:
        chats = [json.loads(line) for line in handle]
    assert {row["kind"] for row in chats} == {"chat", "text"}
    samples["teacher chats"] = "\n".join(row["text"] for row in chats)
    probes = {p.name.removesuffix(".txt.xz"): "\n".join(read_xz_docs(p)) for p in sorted(EVAL_DIR.glob("*.txt.xz"))}
    for name, text in samples.items():
        assert max(overlaps(probes, text).values()) < 0.001, name


def test_overlap_finds_a_shared_passage_and_nothing_in_disjoint_text():
    shared = "the quick brown fox jumps over the lazy dog while the farmer sleeps under the old oak tree"
    reference = "An unrelated sentence about databases and indexes. " * 3 + shared + " and then more text."
    found = overlaps({"shares": "Once upon a time " + shared, "disjoint": "Completely different words " * 20},
                     reference)
    assert found["shares"] > 0.5
    assert found["disjoint"] == 0.0


def test_evaluation_drops_paragraphs_that_training_has():
    seen: set[str] = set()
    dedupe_docs(["A paragraph that training has, long enough to count as text.\n\nAnother trained paragraph here."], seen)
    kept = dedupe_docs(["A paragraph that training has, long enough to count as text.\n\nA new paragraph that no document of training has."], seen)
    assert kept == ["A new paragraph that no document of training has."]


def test_gutenberg_body_and_chapters():
    raw = "Header\n*** START OF THIS EBOOK ***\nCHAPTER 1. One\n\nText one.\n\nCHAPTER 2. Two\n\nText two.\n*** END OF IT ***\nLicence"
    body = gutenberg_body(raw)
    assert "Header" not in body and "Licence" not in body
    assert chapters("Preface.\n\nCHAPTER 1. One\n\nText one.\n\nCHAPTER 2. Two\n\nText two.") == [
        "CHAPTER 1. One\n\nText one.", "CHAPTER 2. Two\n\nText two."]


def test_conversations_are_speaker_lines():
    assert chat_lines(["Hi  there", "Hello!", " ", "Bye"]) == "A: Hi there\nB: Hello!\nB: Bye"
    assert chat_lines(["x", "y", "z"], ["A", "A", "B"]) == "A: x\nA: y\nB: z"


@pytest.mark.parametrize("genre", ["fiction", "nonfiction", "conversation", "technical"])
def test_each_evaluation_genre_reads_as_its_genre(genre):
    docs = read_xz_docs(EVAL_DIR / f"{genre}.txt.xz")
    first = docs[0]
    expected = {"fiction": "Call me Ishmael", "nonfiction": "bushfire", "conversation": "A: ", "technical": "SQLite"}
    assert expected[genre] in first
