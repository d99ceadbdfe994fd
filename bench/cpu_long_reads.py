"""Reads in a long conversation on a CPU: a chunk past the window scores its sinks in each query's
cache frame, either through per-query copies of the sink keys in one call of torch's attention
(the CPU's way) or by re-scoring in the activations' dtype (the compiled GPU path's way). Both are
timed side by side, alternating, on one row of the default model's CPU fast path that holds a full
window; with --ppl, the perplexity past the first 1,024 tokens of three broad evaluation genres
through both (chunks of 64, sink 4 + window 1,020).

    PYTHONPATH=. python bench/cpu_long_reads.py [--ppl]
"""

from __future__ import annotations

import argparse
import lzma
import math
import statistics
import sys
import threading
from pathlib import Path

import torch

from bench.read_cost import timed_ms
from lckv_stream import attention
from lckv_stream.cpu_fast import cpu_fast_model
from lckv_stream.engine import Engine, EngineSettings
from lckv_stream.loading import load_model

WAYS = {"sink copies": ("cpu",), "re-scoring": ()}


def read_times(model, lengths: list[int], rounds: int) -> dict[str, dict[int, float]]:
    engine = Engine(model, EngineSettings.for_device(model.device, compile=False))
    row = engine.open_row(4, 1024, seed=1)
    for _ in range(5):  # 1,280 tokens: every later read overflows the window
        list(engine.prefill(row, list(range(100, 356)), 256, threading.Event()))
    bucket = row.bucket
    times: dict[str, dict[int, list[float]]] = {way: {n: [] for n in lengths} for way in WAYS}
    for _ in range(rounds):
        for way, devices in WAYS.items():
            attention.SINK_COPY_DEVICES = devices
            for length in lengths:
                ids = torch.arange(100, 100 + length).view(1, length)
                times[way][length].append(engine._call(lambda ids=ids: timed_ms(lambda: bucket.prefill(row.index, ids), 5)))
    engine.close()
    attention.SINK_COPY_DEVICES = WAYS["sink copies"]
    return {way: {n: statistics.median(v) for n, v in by_length.items()} for way, by_length in times.items()}


def perplexities(model, tokenizer) -> dict[str, dict[str, float]]:
    sys.path.insert(0, str(Path(__file__).parent))
    from streaming_ppl import token_nll

    fast = cpu_fast_model(model)
    result = {}
    for genre in ("fiction", "conversation", "technical"):
        with lzma.open(Path("data/broad_eval") / f"{genre}.txt.xz", "rt") as handle:
            text = handle.read()
        ids = torch.tensor(tokenizer(text)["input_ids"][:3072])
        result[genre] = {}
        for way, devices in WAYS.items():
            attention.SINK_COPY_DEVICES = devices
            result[genre][way] = math.exp(token_nll(fast, ids, 4, 1020, 64)[1024:].mean().item())
    attention.SINK_COPY_DEVICES = WAYS["sink copies"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", nargs="+", type=int, default=[16, 28, 100, 256])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--ppl", action="store_true")
    args = parser.parse_args()
    model, tokenizer = load_model("default", "cpu")[:2]
    times = read_times(model, args.lengths, args.rounds)
    print("| message tokens | re-scoring ms | sink copies ms | ratio |\n|---|---|---|---|")
    for length in args.lengths:
        old, new = times["re-scoring"][length], times["sink copies"][length]
        print(f"| {length} | {old:.1f} | {new:.1f} | {old / new:.2f}x |")
    if args.ppl:
        print("\n| genre | re-scoring ppl | sink copies ppl |\n|---|---|---|")
        for genre, values in perplexities(model, tokenizer).items():
            print(f"| {genre} | {values['re-scoring']:.3f} | {values['sink copies']:.3f} |")


if __name__ == "__main__":
    main()
