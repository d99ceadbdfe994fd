"""Sample multi-turn chats from the dense base model (the teacher), as token ids for distillation.

All rows advance in lockstep through one batched cache, so no padding is needed: a row feeds its
scripted tokens (system prompt, user turns) one per step and samples whenever its script is empty;
after the assistant's <|im_end|> the next user turn is scripted. Every row ends at exactly --length.

    python scripts/sample_teacher_chats.py --out /tmp/lckv-data/chats.npy --rows 512 --length 1536
"""

from __future__ import annotations

import argparse
import random
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from lckv_stream import identity_map
from lckv_stream.base_model import load_base
from lckv_stream.convert import convert_llama
from lckv_stream.sampling import SamplingSettings, sample_next

TOPICS = """photosynthesis; black holes; the French revolution; Python lists; baking bread; the water cycle;
volcanoes; the stock market; machine learning; honeybees; the Roman empire; climate change; jazz music;
the human heart; electric cars; chess openings; the moon landing; recycling; vaccines; coffee; the internet;
dinosaurs; the periodic table; meditation; gardening; earthquakes; the printing press; solar panels;
octopuses; the Great Wall of China; sleep; rainbows; democracy; the Olympic games; bicycles; tea ceremonies;
glaciers; the immune system; origami; the Renaissance; penguins; recursion in programming; budgeting money;
learning a new language; public speaking; the speed of light; coral reefs; the Silk Road; sourdough starters;
time zones; friendship; job interviews; the theory of evolution; compost; Shakespeare; the deep ocean;
marathon training; the first computers; magnets; volunteering; deserts; the history of writing; clouds;
spiders; mountains; trains; museums; fairy tales; the Amazon rainforest; batteries; healthy breakfasts;
prime numbers; kites; the solar system; wolves; hot air balloons; libraries; pizza; rivers; robots""".split(";")

TASKS = [
    "Explain {t} to a ten-year-old.",
    "Give me three interesting facts about {t}.",
    "Write a short poem about {t}.",
    "What are the pros and cons of {t}?",
    "Summarize what you know about {t} in two sentences.",
    "Compare {t} and {u}.",
    "What is the most common misconception about {t}?",
    "Write a short story involving {t}.",
    "How would you teach someone about {t}?",
    "List some questions a student might ask about {t}.",
    "Hi! Can you help me understand {t}?",
    "Why does {t} matter?",
]
FOLLOW_UPS = [
    "Can you tell me more?", "Give me an example.", "Summarize that in one sentence.", "Why is that?",
    "Explain it differently.", "What else should I know about {t}?", "Thanks! Now tell me about {u}.",
    "Is that really true?", "Make it shorter.", "Can you turn that into a list?",
]
SYSTEMS = [None, None, "You are a concise assistant.", "You are a friendly teacher who explains things simply."]


def scripted_turn(tokenizer, rng: random.Random, first: bool, topic: str) -> list[int]:
    other = rng.choice(TOPICS).strip()
    if first:
        system = rng.choice(SYSTEMS)
        messages = [{"role": "system", "content": system}] if system else []
        messages.append({"role": "user", "content": rng.choice(TASKS).format(t=topic, u=other)})
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    else:
        follow = rng.choice(FOLLOW_UPS).format(t=topic, u=other)
        text = f"\n<|im_start|>user\n{follow}<|im_end|>\n<|im_start|>assistant\n"
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.inference_mode()
def sample_chats(model, tokenizer, rows: int, length: int, settings: SamplingSettings, seed: int) -> np.ndarray:
    rng = random.Random(seed)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    topics = [rng.choice(TOPICS).strip() for _ in range(rows)]
    scripts = [deque(scripted_turn(tokenizer, rng, True, topics[r])) for r in range(rows)]
    cache = model.new_cache(sink=0, window=length, batch_size=rows)
    out = np.zeros((rows, length), dtype=np.uint16)
    logits = None
    for step in range(length):
        sampled = None
        if logits is not None:
            sampled = sample_next(logits, settings, generator, cache.token_ids, cache.token_index >= 0).tolist()
        tokens = []
        for r in range(rows):
            if scripts[r]:
                tokens.append(scripts[r].popleft())
            else:
                tokens.append(sampled[r])
                if sampled[r] == end_of_turn:
                    scripts[r].extend(scripted_turn(tokenizer, rng, False, topics[r]))
        out[:, step] = tokens
        batch = torch.tensor(tokens, device=model.device).view(rows, 1)
        logits = model(batch, cache, logits_to_keep=1).logits[:, -1]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--length", type=int, default=1536)
    parser.add_argument("--batches", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=1e9, help="start no new batch after this long")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    base, tokenizer = load_base("cpu")
    teacher = convert_llama(base, identity_map(base.config.num_hidden_layers)).to(args.device, dtype)
    settings = SamplingSettings(temperature=0.8, top_p=0.95, top_k=50, repetition_penalty=1.1)
    chunks = []
    began = time.time()
    for batch in range(args.batches):
        start = time.time()
        if chunks and (start - began) * (batch + 1) / batch > args.minutes * 60:
            break
        chunks.append(sample_chats(teacher, tokenizer, args.rows, args.length, settings, args.seed + batch))
        elapsed = time.time() - start
        print(f"batch {batch}: {args.rows}x{args.length} tokens in {elapsed:.1f}s "
              f"({args.rows * args.length / elapsed:,.0f} tokens/s)", flush=True)
    chats = np.concatenate(chunks)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, chats)
    print(tokenizer.decode(chats[0][:400].tolist()))


if __name__ == "__main__":
    main()
