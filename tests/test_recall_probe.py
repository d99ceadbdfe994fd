"""The recall probe: its scorer, its items, and one item through ChatSession on a tiny model."""

import sys
from pathlib import Path

import pytest

from app_support.tiny import tiny_model
from lckv_stream import cla_map

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "bench"), str(ROOT / "scripts")]

import chat_seeds  # noqa: E402
import recall_probe  # noqa: E402
from recall_probe import FOLLOW_UPS, follow_up, items, probe_item, recalled  # noqa: E402


@pytest.mark.parametrize("reply, answer", [
    ("The word you asked me to remember is lantern.", "lantern"),
    ("LANTERN!", "lantern"),
    ("Your sister's name is Beatrice.", "Beatrice"),
    ("The code is 4721, as you told me.", "4721"),
    ("Your flight leaves at 6:45 in the morning.", "6:45"),
    ("Your teacher is Mr. Alvarez.", "Alvarez"),
    ("You have 3 brothers.", "3"),
])
def test_a_right_answer_scores_right(reply, answer):
    assert recalled(reply, answer)


@pytest.mark.parametrize("reply, answer", [
    ("I'm sorry, I don't have the ability to remember things.", "lantern"),
    ("The word was lanterns.", "lantern"),
    ("The word was flantern.", "lantern"),
    ("The code is 47210.", "4721"),
    ("Your flight leaves at 6:40.", "6:45"),
    ("You have 13 brothers.", "3"),
    ("", "teal"),
])
def test_a_wrong_answer_scores_wrong(reply, answer):
    assert not recalled(reply, answer)


def test_fifty_distinct_items_whose_question_does_not_give_the_answer():
    probe = items()
    assert len(probe) == 50
    assert len({item["answer"].lower() for item in probe}) == 50
    for item in probe:
        assert recalled(item["tell"], item["answer"]), item
        assert not recalled(item["ask"], item["answer"]), item
    assert len(FOLLOW_UPS) == 20 and all(len(rest) == 2 for _, rest in FOLLOW_UPS)


def test_training_recall_scripts_never_use_the_probe_answers():
    probe = {item["answer"].lower() for item in items()}
    pools = set(chat_seeds.RECALL_WORDS) | set(chat_seeds.RECALL_NAMES) | set(chat_seeds.RECALL_PLACES)
    pools |= {x for _, _, pool in chat_seeds.RECALL_FACTS if pool for x in pool}
    assert not probe & {x.lower() for x in pools}
    assert not {w.lower() for w in chat_seeds.RECALL_WORDS} & {item["answer"].lower() for item in items()}


def test_an_item_runs_through_chat_session(tokenizer, monkeypatch):
    for limit in ("TELL_TOKENS", "FILLER_TOKENS", "ASK_TOKENS", "FOLLOW_TOKENS"):
        monkeypatch.setattr(recall_probe, limit, 3)  # the structure is under test, not the replies
    model = tiny_model(cla_map(4), vocab_size=len(tokenizer))
    item = items()[0]
    result = probe_item(model, tokenizer, item, ["Hello!", "How are you today?"])
    assert set(result) >= {"told_reply", "after_1", "after_1_right", "filler_replies", "after_3", "after_3_right"}
    assert len(result["filler_replies"]) == 2
    assert result["after_1_right"] == recalled(result["after_1"], item["answer"])
    assert result["tokens_held"] > 0
    assert len(follow_up(model, tokenizer, "Hello!", ["Thanks.", "Bye."])) == 3
