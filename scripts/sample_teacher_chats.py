"""Sample multi-turn chats and free text from the dense base model (the teacher), as token ids for distillation.

All rows advance in lockstep through one batched cache, so no padding is needed: a row feeds its
scripted tokens (system prompt, user turns) one per step and samples whenever its script is empty;
after the assistant's <|im_end|> the next user turn is scripted. Every row ends at exactly --length.

Chat rows follow a plan from `chat_seeds.py` (topics x task kinds, follow-ups, topic switches, and in
--recall-share of the chats a fact told in the first message and asked for 1-4 turns later); each row
samples at its own temperature, drawn uniformly from 0.7-1.0 (top-p 0.95, top-k 50, repetition
penalty 1.1). A reply longer than --max-reply tokens is closed so that chats stay multi-turn. Text rows
(--text-share) start from the opening words of a natural document (--prefixes) and let the teacher
continue as plain text, a new opening after each <|endoftext|>.

    python scripts/sample_teacher_chats.py --out /tmp/lckv-data/chats.npy --rows 512 --length 2048 \
        --jsonl /tmp/lckv-data/chats.jsonl

Writes the [rows, length] uint16 array and, with --jsonl, one JSON line per row: its plan (kind,
temperature, topic, task kind, recall answer), user turns and the decoded text.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch

from chat_seeds import DialoguePlan, plan_dialogue
from genre_sources import read_xz_docs
from lckv_stream import identity_map
from lckv_stream.base_model import load_base
from lckv_stream.convert import convert_llama
from lckv_stream.sampling import SamplingSettings, sample_next

SETTINGS = SamplingSettings(temperature=1.0, top_p=0.95, top_k=50, repetition_penalty=1.1)  # per-row T applied first
FALLBACK_OPENINGS = ["It was late in the evening when", "The most important thing to know about", "Dear friend,",
                     "In the small town where I grew up,", "Here is how the process works.", "Q: How do I"]


class Row:
    """One row's script (tokens still to feed) and what it has produced."""

    def __init__(self, tokenizer, rng: random.Random, kind: str, plan: DialoguePlan | None, openings: list[str]) -> None:
        self.tokenizer, self.rng, self.kind, self.plan, self.openings = tokenizer, rng, kind, plan, openings
        self.script: deque[int] = deque()
        self.user_turns: list[str] = []
        self.reply_tokens = 0
        self.temperature = plan.temperature if plan else rng.uniform(0.7, 1.0)
        self.turns = plan.turns() if plan else None
        if plan:
            messages = [{"role": "system", "content": plan.system}] if plan.system else []
            messages.append({"role": "user", "content": next(self.turns)})
            self.user_turns.append(messages[-1]["content"])
            self.feed(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        else:
            self.feed(self.opening())

    def feed(self, text: str) -> None:
        self.script.extend(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def opening(self) -> str:
        words = self.rng.choice(self.openings).split()
        return " ".join(words[: self.rng.randint(8, 40)])

    def after_sample(self, token: int, end_of_turn: int, end_of_text: int, max_reply: int) -> None:
        """Script what follows a sampled token: the next user turn after a reply, a new opening after a text."""
        self.reply_tokens += 1
        if self.plan:
            if token == end_of_turn or self.reply_tokens >= max_reply:
                message = next(self.turns)
                self.user_turns.append(message)
                self.feed(("" if token == end_of_turn else "<|im_end|>")
                          + f"\n<|im_start|>user\n{message}<|im_end|>\n<|im_start|>assistant\n")
                self.reply_tokens = 0
        elif token in (end_of_turn, end_of_text) or self.reply_tokens >= 4 * max_reply:
            self.feed(("" if token == end_of_text else "<|endoftext|>") + self.opening())
            self.reply_tokens = 0

    def record(self) -> dict:
        plan = self.plan
        return {"kind": self.kind, "temperature": round(self.temperature, 3),
                "topic": plan.topic if plan else None, "task_kind": plan.task_kind if plan else None,
                "system": plan.system if plan else None, "recall_answer": plan.recall[0] if plan and plan.recall else None,
                "user_turns": self.user_turns}


def load_openings(folder: Path | None) -> list[str]:
    """Opening paragraphs of natural documents (the .txt.xz files in `folder`), for the text rows;
    conversations are left to the chat rows."""
    if folder is None or not folder.is_dir():
        return FALLBACK_OPENINGS
    paths = [p for p in sorted(folder.glob("*.txt.xz")) if p.name != "conversation.txt.xz"]
    openings = [doc.split("\n\n")[0] for path in paths for doc in read_xz_docs(path)]
    return [o for o in openings if len(o.split()) >= 8] or FALLBACK_OPENINGS


@torch.inference_mode()
def sample_chats(model, tokenizer, rows: int, length: int, seed: int, text_share: float = 0.2,
                 recall_share: float = 0.3, openings: list[str] = FALLBACK_OPENINGS,
                 max_reply: int = 320) -> tuple[np.ndarray, list[dict]]:
    """[rows, length] token ids and one record per row (its plan and user turns)."""
    rng = random.Random(seed)
    generator = torch.Generator(device=model.device).manual_seed(seed)
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    end_of_text = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    state = []
    for _ in range(rows):
        text = rng.random() < text_share
        state.append(Row(tokenizer, random.Random(rng.random()), "text" if text else "chat",
                         None if text else plan_dialogue(rng, recall_share), openings))
    temperatures = torch.tensor([r.temperature for r in state], device=model.device).view(rows, 1)
    cache = model.new_cache(sink=0, window=length, batch_size=rows)
    out = np.zeros((rows, length), dtype=np.uint16)
    logits = None
    for step in range(length):
        sampled = None
        if logits is not None:
            sampled = sample_next(logits.float() / temperatures, SETTINGS, generator, cache.token_ids,
                                  cache.token_index >= 0).tolist()
        tokens = []
        for r, row in enumerate(state):
            if row.script:
                tokens.append(row.script.popleft())
            else:
                tokens.append(sampled[r])
                row.after_sample(sampled[r], end_of_turn, end_of_text, max_reply)
        out[:, step] = tokens
        batch = torch.tensor(tokens, device=model.device).view(rows, 1)
        logits = model(batch, cache, logits_to_keep=1).logits[:, -1]
    return out, [row.record() for row in state]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--jsonl", type=Path, help="also write each row's plan and decoded text here")
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--length", type=int, default=1536)
    parser.add_argument("--batches", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--text-share", type=float, default=0.2, help="rows of free text instead of a chat")
    parser.add_argument("--recall-share", type=float, default=0.3, help="chats with a remember-and-ask script")
    parser.add_argument("--max-reply", type=int, default=320)
    parser.add_argument("--prefixes", type=Path, default=Path(".data/genres"),
                        help="folder of .txt.xz documents whose openings start the text rows")
    parser.add_argument("--minutes", type=float, default=1e9, help="start no new batch after this long")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    base, tokenizer = load_base("cpu")
    teacher = convert_llama(base, identity_map(base.config.num_hidden_layers)).to(args.device, dtype)
    openings = load_openings(args.prefixes)
    chunks, records = [], []
    began = time.time()
    for batch in range(args.batches):
        start = time.time()
        if chunks and (start - began) * (batch + 1) / batch > args.minutes * 60:
            break
        ids, meta = sample_chats(teacher, tokenizer, args.rows, args.length, args.seed + batch, args.text_share,
                                 args.recall_share, openings, args.max_reply)
        chunks.append(ids)
        records += meta
        elapsed = time.time() - start
        print(f"batch {batch}: {args.rows}x{args.length} tokens in {elapsed:.1f}s "
              f"({args.rows * args.length / elapsed:,.0f} tokens/s)", flush=True)
    chats = np.concatenate(chunks)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.save(args.out, chats)
    if args.jsonl:
        with open(args.jsonl, "w", encoding="utf-8") as handle:
            for row, record in zip(chats, records):
                handle.write(json.dumps({**record, "text": tokenizer.decode(row.tolist())}) + "\n")
    print(tokenizer.decode(chats[0][:400].tolist()))


if __name__ == "__main__":
    main()
