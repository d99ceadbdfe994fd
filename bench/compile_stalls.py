"""How much a compile on the side holds up the conversations that are already generating.

The engine compiles a new bucket's steps on a thread of its own while it serves. Two measurements:

  engine   : one conversation generates alone, then again while a row of a new window opens (a new
             bucket: its steps compile on the side), then alone again; the gaps between its tokens,
             and how long the new row's first read took.
  watchdog : a thread that only sleeps 1 ms at a time, while the step of a fresh shape compiles
             cold (a compile cache of its own) on a thread of its process, then in a child process,
             then on a thread again from the cache the child filled: how late its wake-ups come. A thread can only run when it holds the interpreter lock,
             so this is what any other thread of the process (the engine's) waits for.

    PYTHONPATH=. python bench/compile_stalls.py                    # tiny model, this machine's device
    PYTHONPATH=. python bench/compile_stalls.py --model random     # the default model's shape
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import torch

from bench.bench_engine import build_model, wait_compiled
from lckv_stream.cpu_threads import in_passing_thread
from lckv_stream.engine import Engine, EngineSettings
from lckv_stream.sampling import SamplingSettings

CHILD = """
import sys, torch
sys.path.insert(0, {root!r})
from bench.compile_stalls import compile_fresh_step
compile_fresh_step({model!r})
"""


def compile_fresh_step(kind: str) -> None:
    """Compile the one-row step of a cache shape nothing else uses (its compile cache is the caller's)."""
    from lckv_stream.decoding import compile_step

    model = build_model(kind)
    cache = model.new_cache(4, 512, batch_size=1)
    step = compile_step({})
    with torch.inference_mode():
        step(model, torch.zeros(1, 1, dtype=torch.long, device=cache.device), cache)


def late_wakes(run) -> dict:
    """Run `run()` while a thread sleeps 1 ms at a time; how late its wake-ups came (ms)."""
    delays: list[float] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            began = time.perf_counter()
            time.sleep(0.001)
            delays.append((time.perf_counter() - began - 0.001) * 1e3)

    watcher = threading.Thread(target=watch)
    watcher.start()
    began = time.perf_counter()
    run()
    seconds = time.perf_counter() - began
    done.set()
    watcher.join()
    delays.sort()
    return {"seconds": seconds, "wakes": len(delays), "over_50": sum(d > 50 for d in delays),
            "worst": delays[-1] if delays else 0.0, "p99": delays[int(0.99 * len(delays))] if delays else 0.0}


def part_watchdog(kind: str) -> None:
    """Each row in a process of its own (Dynamo keeps what it compiled for the life of a process)."""
    print("| compile of a fresh step | s | wake-ups | late by > 50 ms | 99th percentile ms | worst ms |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="lckv-stalls-") as cold, \
            tempfile.TemporaryDirectory(prefix="lckv-stalls-") as filled:
        rows = (("in a thread of this process, cold", "thread", cold),
                ("in a child process, cold", "child", filled),
                ("in a thread, loaded from the cache the child filled", "thread", filled))
        for label, where, folder in rows:
            output = subprocess.run([sys.executable, __file__, "--model", kind, "--watch", where],
                                    env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": folder, "PYTHONPATH": os.getcwd()},
                                    capture_output=True, text=True, check=True).stdout
            result = json.loads(output.splitlines()[-1])
            print(f"| {label} | {result['seconds']:.1f} | {result['wakes']:,} | {result['over_50']} | "
                  f"{result['p99']:.1f} | {result['worst']:.0f} |")


def watch_one(kind: str, where: str) -> None:
    """One row of part_watchdog (the compile cache: TORCHINDUCTOR_CACHE_DIR, the child's too)."""
    if where == "child":
        code = CHILD.format(root=os.getcwd(), model=kind)
        result = late_wakes(lambda: subprocess.run([sys.executable, "-c", code], check=True))
    else:
        result = late_wakes(lambda: in_passing_thread(compile_fresh_step, kind))
    print(json.dumps(result))


def part_engine(kind: str, tokens: int) -> None:
    model = build_model(kind)
    engine = Engine(model, EngineSettings.for_device(model.device, compiled_classes=(1,), max_batch=2))
    row = engine.open_row(4, 256, seed=0)
    list(engine.prefill(row, list(range(5, 25)), 256, threading.Event()))
    print(f"compiled the first bucket in {wait_compiled(engine, 900):.0f} s: {engine.decoder_name(row)}")
    settings = SamplingSettings(temperature=0.8, max_new_tokens=tokens)
    first_read: list[float] = []

    def open_new_bucket() -> None:
        other = engine.open_row(4, 2048, seed=1)  # a window no bucket has yet
        began = time.perf_counter()
        list(engine.prefill(other, [5, 6, 7], 256, threading.Event()))
        first_read.append((time.perf_counter() - began) * 1e3)

    print("| the conversation generates | tokens | gaps > 50 ms | their sum ms | median ms | worst ms |")
    print("|---|---|---|---|---|---|")
    for label, meanwhile in (("alone", None), ("while a new bucket compiles", open_new_bucket), ("alone again", None)):
        stream, _ = engine.generate(row, settings, frozenset(), threading.Event())
        gaps = []
        for index, (_, ms) in enumerate(stream):
            gaps.append(ms)
            if index == 5 and meanwhile is not None:
                threading.Thread(target=meanwhile).start()
        gaps = gaps[1:]  # the first token's gap is the read before it
        stalls = [gap for gap in gaps if gap > 50]
        print(f"| {label} | {len(gaps)} | {len(stalls)} | {sum(stalls):,.0f} | {statistics.median(gaps):.2f} | "
              f"{max(gaps):,.0f} |")
        engine.reset(row)
        list(engine.prefill(row, list(range(5, 25)), 256, threading.Event()))
    print(f"the new bucket's first read (3 tokens): {first_read[0]:,.0f} ms; "
          f"compiles still running at the end: {engine.stats().compiling}")
    engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("tiny", "random"), default="tiny")
    parser.add_argument("--parts", nargs="+", choices=("engine", "watchdog"), default=["engine", "watchdog"])
    parser.add_argument("--tokens", type=int, default=150, help="tokens the conversation generates each time")
    parser.add_argument("--watch", choices=("thread", "child"), help=argparse.SUPPRESS)  # one watchdog row
    args = parser.parse_args()
    if args.watch:
        watch_one(args.model, args.watch)
        return
    print(f"device: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}, {os.cpu_count()} CPUs")
    if "engine" in args.parts:
        part_engine(args.model, args.tokens)
    if "watchdog" in args.parts:
        part_watchdog(args.model)


if __name__ == "__main__":
    main()
