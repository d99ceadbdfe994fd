"""Recall across turns: does the model give back a word or fact told earlier in the chat?

Each of 50 items is told in one turn and asked for in the next one (one turn later) and, in the same
chat after undoing that question, after two unrelated turns (three turns later). Both models talk
through `ChatSession` with the default cache (4 sinks + a window of 1,024) and the same chat template,
greedy (temperature 0, no repetition penalty, so the run is deterministic and nothing discourages
repeating the word). A reply counts as right when it contains the answer as a whole word or phrase
(`recalled`). Also runs 20 three-turn conversations with follow-up questions and saves both models'
replies side by side. On the CPU both models run at once, one process each (bench/model_pair.py).

    python bench/recall_probe.py --out bench/results/recall
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import unicodedata
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lckv_stream.chat import CacheSettings, ChatSession, TurnEnd  # noqa: E402
from lckv_stream.sampling import SamplingSettings  # noqa: E402

WORDS = ["lantern", "pebble", "violet", "harbor", "cinnamon", "glacier", "trumpet", "walnut", "meadow", "falcon",
         "saddle", "marble", "thunder", "kettle", "orchid", "compass", "velvet", "anchor", "puzzle", "maple",
         "copper", "blossom", "ladder", "nectar", "canyon"]
FACTS = [  # (statement, question, answer)
    ("My sister's name is Beatrice.", "What is my sister's name?", "Beatrice"),
    ("My dog is called Biscuit.", "What is my dog called?", "Biscuit"),
    ("My locker code is 4721.", "What is my locker code?", "4721"),
    ("I was born in Lisbon.", "Where was I born?", "Lisbon"),
    ("My favourite colour is teal.", "What is my favourite colour?", "teal"),
    ("My flight leaves at 6:45.", "When does my flight leave?", "6:45"),
    ("My best friend is named Oswald.", "What is my best friend's name?", "Oswald"),
    ("I drive a green Volvo.", "What car do I drive?", "Volvo"),
    ("My favourite fruit is the mango.", "What is my favourite fruit?", "mango"),
    ("My room number is 318.", "What is my room number?", "318"),
    ("My grandmother grew up in Norway.", "Where did my grandmother grow up?", "Norway"),
    ("I play the cello.", "Which instrument do I play?", "cello"),
    ("My cat's name is Pumpkin.", "What is my cat's name?", "Pumpkin"),
    ("The meeting is on Thursday.", "Which day is the meeting?", "Thursday"),
    ("My password hint is sunflower.", "What is my password hint?", "sunflower"),
    ("My teacher's name is Mr. Alvarez.", "What is my teacher's name?", "Alvarez"),
    ("I have 3 brothers.", "How many brothers do I have?", "3"),
    ("My favourite author is Tolstoy.", "Who is my favourite author?", "Tolstoy"),
    ("My bike is painted yellow.", "What colour is my bike?", "yellow"),
    ("I work as a carpenter.", "What is my job?", "carpenter"),
    ("My parrot is called Kiwi.", "What is my parrot called?", "Kiwi"),
    ("My lucky number is 17.", "What is my lucky number?", "17"),
    ("I am allergic to peanuts.", "What am I allergic to?", "peanuts"),
    ("My hometown is Denver.", "What is my hometown?", "Denver"),
    ("My favourite sport is badminton.", "What is my favourite sport?", "badminton"),
]
FILLERS = ["Give me one tip for staying focused while studying.", "Name a vegetable that is orange.",
           "What is a good name for a goldfish?", "Tell me a fun fact about octopuses.",
           "How many days are in a leap year?", "Suggest a quick breakfast idea.",
           "What is the opposite of cold?", "Recommend a hobby for a rainy day."]
FOLLOW_UPS = [  # (first message, two follow-ups)
    ("What is a volcano?", ["How do scientists predict eruptions?", "Which one is the most famous?"]),
    ("Give me a recipe for pancakes.", ["Can I make them without eggs?", "How do I keep them warm?"]),
    ("Explain what a budget is.", ["How do I start one?", "What if I overspend one month?"]),
    ("Tell me about the Moon.", ["Why does it change shape?", "Could people live there?"]),
    ("What is Python used for?", ["Is it good for beginners?", "What should I learn first?"]),
    ("Write a short poem about autumn.", ["Now make it rhyme.", "Give it a title."]),
    ("How do plants grow?", ["What happens without sunlight?", "Which plants grow fastest?"]),
    ("What causes rain?", ["Why are some clouds dark?", "What is a rainbow?"]),
    ("I want to start running. Any advice?", ["How often should I run?", "What shoes do I need?"]),
    ("Who was Leonardo da Vinci?", ["What are his famous paintings?", "Did he invent anything?"]),
    ("What is the difference between weather and climate?", ["Give me an example.", "Why does it matter?"]),
    ("Suggest a name for my new puppy.", ["Something shorter, please.", "Why did you pick that one?"]),
    ("How does a computer store data?", ["What is a byte?", "How big is a gigabyte?"]),
    ("Tell me a short story about a dragon.", ["What happened next?", "How does it end?"]),
    ("What should I pack for a beach trip?", ["What if it rains?", "What snacks are good?"]),
    ("Explain photosynthesis simply.", ["Why are leaves green?", "Do all plants do it?"]),
    ("How can I sleep better?", ["What about naps?", "Is coffee bad for sleep?"]),
    ("What is the water cycle?", ["Where does the water go after rain?", "Summarize it in one sentence."]),
    ("Help me write an email asking for a day off.", ["Make it more polite.", "Make it shorter."]),
    ("Why is the sky blue?", ["Why are sunsets red?", "Is the sky blue on Mars?"]),
]
TELL_TOKENS, FILLER_TOKENS, ASK_TOKENS, FOLLOW_TOKENS = 24, 32, 24, 64


def items() -> list[dict]:
    """The 50 probe items: a word to remember, or a fact about the user."""
    out = [{"kind": "word", "tell": f"Please remember this word: {w}. I will ask you for it later.",
            "ask": "What was the word I asked you to remember?", "answer": w} for w in WORDS]
    out += [{"kind": "fact", "tell": f"{s} Please remember that.", "ask": q, "answer": a} for s, q, a in FACTS]
    return out


def _normalise(text: str) -> str:
    text = unicodedata.normalize("NFKC", text).lower().replace("’", "'")
    return " ".join(re.findall(r"[a-z0-9]+(?:[:.'][a-z0-9]+)*", text))


def recalled(reply: str, answer: str) -> bool:
    """True when `reply` contains `answer` as a whole word or phrase (case, punctuation and spacing aside)."""
    needle = _normalise(answer)
    return bool(needle) and re.search(rf"(?<![a-z0-9]){re.escape(needle)}(?![a-z0-9])", _normalise(reply)) is not None


def reply_to(chat: ChatSession, message: str, max_new_tokens: int) -> str:
    """Send one message, greedy, and return the whole reply."""
    sampling = SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=max_new_tokens)
    for event in chat.send(message, sampling):
        if isinstance(event, TurnEnd):
            return event.reply
    raise RuntimeError("the turn ended without a TurnEnd event")


def probe_item(model, tokenizer, item: dict, fillers: list[str]) -> dict:
    """One item: told, asked one turn later, then (question undone) asked after two other turns."""
    chat = ChatSession(model, tokenizer, cache_settings=CacheSettings())
    told = reply_to(chat, item["tell"], TELL_TOKENS)
    after_one = reply_to(chat, item["ask"], ASK_TOKENS)
    chat.undo()
    filler_replies = [reply_to(chat, f, FILLER_TOKENS) for f in fillers]
    after_three = reply_to(chat, item["ask"], ASK_TOKENS)
    return {"told_reply": told, "after_1": after_one, "after_1_right": recalled(after_one, item["answer"]),
            "fillers": fillers, "filler_replies": filler_replies, "after_3": after_three,
            "after_3_right": recalled(after_three, item["answer"]), "tokens_held": chat.stats().cache.tokens_held}


def follow_up(model, tokenizer, first: str, follows: list[str]) -> list[str]:
    chat = ChatSession(model, tokenizer, cache_settings=CacheSettings())
    return [reply_to(chat, message, FOLLOW_TOKENS) for message in [first, *follows]]


def converse(model, tokenizer, probe: list[dict], follow_ups: list[tuple[str, list[str]]]) -> dict:
    """Everything one model says in the probe: each item's turns, then each follow-up conversation."""
    results = []
    for i, item in enumerate(probe):
        results.append(probe_item(model, tokenizer, item, fillers_for(i)))
        print(f"  {len(set(model.config.layer_types.split('_')))} KV layers: item {i + 1}/{len(probe)}", flush=True)
    return {"items": results, "follow_ups": [follow_up(model, tokenizer, first, rest) for first, rest in follow_ups]}


def fillers_for(index: int) -> list[str]:
    return [FILLERS[(2 * index) % len(FILLERS)], FILLERS[(2 * index + 1) % len(FILLERS)]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="default")
    parser.add_argument("--items", type=int, default=50)
    parser.add_argument("--follow-ups", type=int, default=20)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    from model_pair import MODELS, for_both

    began = time.time()
    probe, talks_in = items()[: args.items], FOLLOW_UPS[: args.follow_ups]
    said = for_both(converse, probe, talks_in, student=args.student)
    rows = [{**item, **{name: said[name]["items"][i] for name in MODELS}} for i, item in enumerate(probe)]
    rates = {name: {f"after_{k}": sum(r[name][f"after_{k}_right"] for r in rows) / len(rows) for k in (1, 3)}
             for name in MODELS}
    talks = [{"turns": [{"user": user, **{name: said[name]["follow_ups"][t][k] for name in MODELS}}
                        for k, user in enumerate([first, *rest])]} for t, (first, rest) in enumerate(talks_in)]
    minutes = (time.time() - began) / 60
    summary = {"rates": rates, "items": len(rows), "follow_ups": len(talks), "minutes": round(minutes, 1),
               "sampling": "greedy, repetition penalty 1.0", "cache": "default: 4 sinks + a window of 1,024",
               "max_new_tokens": {"tell": TELL_TOKENS, "filler": FILLER_TOKENS, "ask": ASK_TOKENS, "follow_up": FOLLOW_TOKENS}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recall.json").write_text(json.dumps({"summary": summary, "items": rows}, indent=1) + "\n")
    (args.out / "follow_ups.json").write_text(json.dumps(talks, indent=1) + "\n")
    for name in MODELS:
        print(f"{name}: recalled after 1 turn {rates[name]['after_1']:.0%}, after 3 turns {rates[name]['after_3']:.0%}")
    print(f"{minutes:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
