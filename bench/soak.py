"""Soak: thousands of scripted chat turns through one `ChatSession` on the GPU (CUDA-graph decoder).

Per turn it records the mean decode latency, the cache bytes, tokens held / seen and the GPU memory
allocated; writes JSON and a PNG plot of latency and memory over the turns.

    python bench/soak.py --turns 5000 --tokenizer TOKENIZER_FOLDER --out bench/results/soak
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from lckv_stream.chat import CacheSettings, ChatSession, TurnEnd
from lckv_stream.sampling import SamplingSettings

MESSAGES = ["Tell me about rivers.", "Why?", "Give an example.", "And then what happened next in the story?",
            "Summarize the last answer in one sentence, please.", "ok"]


def load(model_source: str, tokenizer_folder: str | None):
    if model_source == "random":
        from transformers import AutoTokenizer

        from bench_decode import smollm_config  # its neighbour in bench/
        from transformers import LlamaForCausalLM

        from lckv_stream.convert import convert_llama
        from lckv_stream.default_model import default_layer_types

        torch.manual_seed(0)
        dense = LlamaForCausalLM(smollm_config()).to("cuda", torch.bfloat16)
        return convert_llama(dense, default_layer_types()), AutoTokenizer.from_pretrained(tokenizer_folder)
    from lckv_stream.loading import load_model

    return load_model(model_source, "cuda")


class GpuTokenTimer:
    """Times each token's GPU work (sampling and the decode step, as the engine queues them) with CUDA
    events, no host work in it, so that a change in the engine's per-token latency can be told apart
    from a change in the GPU's work."""

    def __init__(self) -> None:
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []

    def attach(self, chat: ChatSession) -> None:
        decoder = chat._decoder  # built on the first turn; rebuilt only when the cache shape changes
        if decoder is None or getattr(decoder, "timed_by_soak", False):
            return
        sample_and_step = decoder.sample_and_step

        def timed(*args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            result = sample_and_step(*args, **kwargs)
            end.record()
            self._events.append((begin, end))
            return result

        decoder.sample_and_step, decoder.timed_by_soak = timed, True

    def mean_ms(self) -> float | None:
        """Mean GPU time per token since the last call (the engine has synchronized after each)."""
        times = [begin.elapsed_time(end) for begin, end in self._events]
        self._events.clear()
        return sum(times) / len(times) if times else None


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    turns = [r["turn"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    top.plot(turns, [r["decode_ms"] for r in rows], lw=0.6)
    top.set_ylabel("decode ms/token (turn mean)")
    top.set_ylim(bottom=0)
    bottom.plot(turns, [r["cache_mb"] for r in rows], label="cache MB (allocated)")
    bottom.plot(turns, [r["gpu_mb"] for r in rows], label="GPU MB allocated (process)")
    bottom.plot(turns, [r["dense_mb"] for r in rows], label="dense cache MB for the same conversation", ls="--")
    bottom.set_yscale("log")
    bottom.set_ylabel("MB")
    bottom.set_xlabel("turn")
    bottom.legend(fontsize=8)
    fig.suptitle("Soak: per-turn latency and memory")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=5000)
    parser.add_argument("--model", default="default", help="'default', a folder, or 'random' (same architecture)")
    parser.add_argument("--tokenizer", help="tokenizer folder for --model random")
    parser.add_argument("--sink", type=int, default=4)
    parser.add_argument("--window", type=int, default=1020)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--gpu-token-times", action="store_true",
                        help="also record each turn's mean GPU time per token, sampling and step (CUDA events)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model, tokenizer = load(args.model, args.tokenizer)
    chat = ChatSession(model, tokenizer, cache_settings=CacheSettings(args.sink, args.window), seed=0,
                       sampling=SamplingSettings(temperature=0.8, max_new_tokens=args.max_new_tokens))
    timer = GpuTokenTimer() if args.gpu_token_times else None
    rows = []
    began = time.time()
    for turn in range(args.turns):
        end = [e for e in chat.send(MESSAGES[turn % len(MESSAGES)]) if isinstance(e, TurnEnd)][0]
        stats = chat.stats()
        if timer:
            timer.attach(chat)
        rows.append({
            "turn": turn + 1, "decode_ms": end.metrics.decode_ms_per_token, "ttft_ms": end.metrics.ttft_ms,
            "new_tokens": end.metrics.new_tokens, "cache_mb": stats.cache.allocated_mb,
            "held": stats.cache.tokens_held, "conversation_tokens": stats.conversation_tokens,
            "dense_mb": stats.dense_bytes / 2**20, "gpu_mb": torch.cuda.memory_allocated() / 2**20,
        } | ({"gpu_token_ms": timer.mean_ms()} if timer else {}))
        if (turn + 1) % 500 == 0 or turn + 1 == args.turns:
            print(json.dumps(rows[-1]), f"{time.time() - began:.0f}s", flush=True)
            save(rows, chat, args)  # partial results survive a run cut short
    plot(rows, args.out / "soak.png")
    table = flatness_table(rows)
    print(table)
    (args.out / "flatness.txt").write_text(table + "\n")


def flatness_table(rows: list[dict], block: int = 500) -> str:
    """Per block of turns: median per-token latency and memory, each against the whole run (the
    targets: latency within ±10%, memory within ±1%); with --gpu-token-times also the GPU time per token."""
    def median(values):
        return statistics.median(values) if values else float("nan")

    latency = median([r["decode_ms"] for r in rows if r["decode_ms"]])
    timed = any(r.get("gpu_token_ms") for r in rows)
    gpu_ms = median([r["gpu_token_ms"] for r in rows if r.get("gpu_token_ms")]) if timed else None
    lines = [f"overall median latency {latency:.3f} ms/token" + (f"; on the GPU {gpu_ms:.3f} ms/token" if timed else ""),
             "| turns | median ms/token | vs overall | cache MB min-max | GPU MB min-max |"
             + (" GPU ms/token | vs overall |" if timed else ""),
             "|---|---|---|---|---|" + ("---|---|" if timed else "")]
    for start in range(0, len(rows), block):
        part = rows[start : start + block]
        ms = median([r["decode_ms"] for r in part if r["decode_ms"]])
        cache = [r["cache_mb"] for r in part]
        gpu = [r["gpu_mb"] for r in part]
        line = (f"| {start + 1}-{start + len(part)} | {ms:.3f} | {100 * (ms / latency - 1):+.1f}% | "
                f"{min(cache):.2f}-{max(cache):.2f} | {min(gpu):.1f}-{max(gpu):.1f} |")
        if timed:
            part_gpu_ms = median([r["gpu_token_ms"] for r in part if r.get("gpu_token_ms")])
            line += f" {part_gpu_ms:.3f} | {100 * (part_gpu_ms / gpu_ms - 1):+.1f}% |"
        lines.append(line)
    return "\n".join(lines)


def save(rows: list[dict], chat: ChatSession, args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"decoder": chat.stats().decoder, "device": torch.cuda.get_device_name(), "turns": len(rows),
               "model": args.model, "sink": args.sink, "window": args.window}
    (args.out / "soak.json").write_text(json.dumps({"summary": summary, "rows": rows}))


if __name__ == "__main__":
    main()
