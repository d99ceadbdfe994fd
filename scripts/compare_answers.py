"""Greedy answers of the dense base (teacher) and the default LCKV model (student) to a few prompts,
as a Markdown table for the model card.

    python scripts/compare_answers.py > answers.md
"""

from __future__ import annotations

from lckv_stream import identity_map
from lckv_stream.base_model import load_base
from lckv_stream.convert import convert_llama
from lckv_stream.default_model import load_default_model
from lckv_stream.chat import CacheSettings, ChatSession, TurnEnd
from lckv_stream.sampling import SamplingSettings

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain photosynthesis in one sentence.",
    "Write a haiku about the sea.",
    "What is 12 plus 30?",
]


def answer(model, tokenizer, prompt: str) -> str:
    session = ChatSession(model, tokenizer, cache_settings=CacheSettings(4, 1024),
                          sampling=SamplingSettings(temperature=0, max_new_tokens=80, repetition_penalty=1.1))
    return next(e for e in session.send(prompt) if isinstance(e, TurnEnd)).reply.strip()


def main() -> None:
    base, tokenizer = load_base("cpu", progress=lambda _: None)
    teacher = convert_llama(base, identity_map(base.config.num_hidden_layers))
    student, _ = load_default_model("cpu", progress=lambda _: None)
    kv_layers = len(student.config.layer_map.producers)
    print(f"| prompt | teacher (dense, 30 KV layers) | student (default, {kv_layers} KV layers) |")
    print("|---|---|---|")
    for prompt in PROMPTS:
        cells = [prompt] + [answer(m, tokenizer, prompt).replace("\n", " ").replace("|", "/") for m in (teacher, student)]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
