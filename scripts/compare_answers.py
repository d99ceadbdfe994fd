"""Greedy answers of the dense base (teacher) and the default LCKV model (student) to a few prompts,
as a Markdown table for the model card (float32 steps); `--cpu-fast`: the student in float32 next
to the student on the CPU fast path (int8 weights, the app's default on a CPU).

    python scripts/compare_answers.py > answers.md
    python scripts/compare_answers.py --cpu-fast
"""

from __future__ import annotations

import argparse

import torch

from lckv_stream import identity_map
from lckv_stream.base_model import load_base
from lckv_stream.chat import CacheSettings, ChatSession, TurnEnd
from lckv_stream.convert import convert_llama
from lckv_stream.default_model import load_default_model
from lckv_stream.engine import Engine, EngineSettings
from lckv_stream.sampling import SamplingSettings

PROMPTS = [
    "What is the capital of France?",
    "Give me three tips for sleeping better.",
    "Explain photosynthesis in one sentence.",
    "Write a haiku about the sea.",
    "What is 12 plus 30?",
]


def engine(model, fast: bool) -> Engine:
    """An engine of float32 steps, or of the CPU fast path (its batch-1 step compiled first)."""
    return Engine(model, EngineSettings.for_device(torch.device("cpu"), cpu_fast=fast, compile=fast))


def answer(model, tokenizer, prompt: str, served_by: Engine) -> str:
    session = ChatSession(model, tokenizer, cache_settings=CacheSettings(4, 1024), engine=served_by,
                          sampling=SamplingSettings(temperature=0, max_new_tokens=80, repetition_penalty=1.1))
    return next(e for e in session.send(prompt) if isinstance(e, TurnEnd)).reply.strip()


def cell(text: str) -> str:
    return text.replace("\n", " ").replace("|", "/")


def cpu_fast_table() -> None:
    import time

    student, tokenizer = load_default_model("cpu", progress=lambda _: None)
    exact, fast = engine(student, False), engine(student, True)
    answer(student, tokenizer, "Hello!", fast)  # builds the bucket and starts its side compile
    while fast.stats().compiling:
        time.sleep(1)
    rows = [(prompt, answer(student, tokenizer, prompt, exact), answer(student, tokenizer, prompt, fast))
            for prompt in PROMPTS]
    session = ChatSession(student, tokenizer, engine=fast)
    print(f"| prompt | student, float32 | student, {session.stats().decoder} |")
    print("|---|---|---|")
    for prompt, float_answer, fast_answer in rows:
        print(f"| {prompt} | {cell(float_answer)} | {cell(fast_answer)} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-fast", action="store_true", help="student float32 against the CPU fast path")
    if parser.parse_args().cpu_fast:
        cpu_fast_table()
        return
    base, tokenizer = load_base("cpu", progress=lambda _: None)
    teacher = convert_llama(base, identity_map(base.config.num_hidden_layers))
    student, _ = load_default_model("cpu", progress=lambda _: None)
    kv_layers = len(student.config.layer_map.producers)
    print(f"| prompt | teacher (dense, 30 KV layers) | student (default, {kv_layers} KV layers) |")
    print("|---|---|---|")
    engines = [(m, engine(m, False)) for m in (teacher, student)]
    for prompt in PROMPTS:
        cells = [prompt] + [cell(answer(m, tokenizer, prompt, served_by)) for m, served_by in engines]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
