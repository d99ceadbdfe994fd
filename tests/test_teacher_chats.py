"""The distillation data formats: teacher chat plans, lockstep sampling, and the genre mix."""

import lzma
import random
import sys
from pathlib import Path

import numpy as np
import pytest

from app_support.tiny import tiny_model, tiny_tokenizer
from lckv_stream import cla_map
from lckv_stream.chat_format import CHATML_TEMPLATE

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from chat_seeds import TASKS, all_topics, plan_dialogue  # noqa: E402
from prepare_text_data import join_docs  # noqa: E402
from sample_teacher_chats import FALLBACK_OPENINGS, load_openings, sample_chats  # noqa: E402
from tokenize_corpora import dialogue_as_chat, encode_mix  # noqa: E402


@pytest.fixture(scope="module")
def chat_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer


def test_plans_vary_topics_tasks_and_temperatures():
    rng = random.Random(0)
    plans = [plan_dialogue(rng) for _ in range(300)]
    assert len({p.topic for p in plans}) > 100 and len(all_topics()) > 150
    assert len({p.task_kind for p in plans}) == len({kind for kind, _ in TASKS}) >= 10
    assert all(0.7 <= p.temperature <= 1.0 for p in plans)
    assert 0.2 < sum(p.recall is not None for p in plans) / len(plans) < 0.4
    assert len({p.system for p in plans}) > 3


def test_a_recall_plan_asks_for_what_it_told_at_the_planned_turn():
    rng = random.Random(1)
    plans = [p for p in (plan_dialogue(rng, recall_share=1.0) for _ in range(40))]
    for plan in plans:
        answer, question, after = plan.recall
        assert answer in plan.first and 1 <= after <= 4
        turns = plan.turns()
        said = [next(turns) for _ in range(after + 1)]
        assert said[after] == question
        assert question not in said[1:after]


def test_lockstep_sampling_makes_rows_of_exact_length_in_chatml(chat_tokenizer):
    model = tiny_model(cla_map(4), vocab_size=len(chat_tokenizer))
    ids, records = sample_chats(model, chat_tokenizer, rows=4, length=192, seed=3, text_share=0.5,
                                recall_share=1.0, openings=["A plain opening sentence of some natural text here."],
                                max_reply=12)
    assert ids.shape == (4, 192) and ids.dtype == np.uint16
    start = chat_tokenizer.convert_tokens_to_ids("<|im_start|>")
    kinds = [r["kind"] for r in records]
    assert {"chat", "text"} == set(kinds)
    for row, record in zip(ids, records):
        assert 0.7 <= record["temperature"] <= 1.0
        if record["kind"] == "chat":
            assert row[0] == start
            assert chat_tokenizer.decode(row.tolist()).count("<|im_start|>user") == len(record["user_turns"])
            assert len(record["user_turns"]) >= 2  # replies are closed at max_reply, so chats go on
            assert record["recall_answer"] in record["user_turns"][0]
        else:
            assert start not in row.tolist()[:5]
            assert record["user_turns"] == []


def test_sampling_is_reproducible(chat_tokenizer):
    model = tiny_model(cla_map(4), vocab_size=len(chat_tokenizer))
    first, _ = sample_chats(model, chat_tokenizer, rows=2, length=40, seed=5)
    again, _ = sample_chats(model, chat_tokenizer, rows=2, length=40, seed=5)
    assert (first == again).all()


def test_dialogues_become_chatml_with_user_and_assistant(chat_tokenizer):
    text = dialogue_as_chat(chat_tokenizer, "A: Hello there\nB: Hi! How can I help?\nB: Ask away.\nA: Thanks")
    assert text.count("<|im_start|>user") == 2 and text.count("<|im_start|>assistant") == 1
    assert "Hi! How can I help?\nAsk away." in text


def test_the_mix_counts_every_token_by_genre(chat_tokenizer):
    labelled = [("documentation and dictionaries", "A definition of a word, with an example."),
                ("narrative", "It was a dark and stormy night. The fox ran."), ("news", "Prices fell today."),
                ("conversation", "A: Hello\nB: Hi there"), ("faq", "Q: What is it? A: A thing.")] * 3
    ids, counts = encode_mix(chat_tokenizer, labelled, chat_share=0.35, seed=0)
    assert len(counts) == 5 and all(c["documents"] == 3 for c in counts.values())
    assert sum(c["tokens"] for c in counts.values()) == len(ids)
    separator = chat_tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert int((ids == separator).sum()) == len(labelled)
    assert "<|im_start|>assistant\nHi there" in chat_tokenizer.decode(ids.tolist())


def test_text_rows_open_with_natural_prose_not_conversations(tmp_path):
    prose = "It was the best of times, it was the worst of times, said the narrator."
    (tmp_path / "narrative.txt.xz").write_bytes(lzma.compress(join_docs([prose + "\n\nMore."]).encode()))
    (tmp_path / "conversation.txt.xz").write_bytes(lzma.compress(join_docs(["A: hi there how are you today\nB: fine"]).encode()))
    assert load_openings(tmp_path) == [prose]
    assert load_openings(tmp_path / "missing") == FALLBACK_OPENINGS
