"""The app's many-users workload through the engine alone (no web server), with the engine's time split.

N `ChatSession`s on N threads share one engine, each sending --turns messages answered with
--max-new-tokens tokens at temperature 0.7 (the messages and settings of bench_app_users.py). Runs
1 user and each of --users, interleaved --repeats times, and prints per run where the engine's
thread spent its time: batched steps per batch size class, message reading (prefill), and the rest
of the scheduler's iterations. Against bench_app_users.py it separates what the engine costs from
what the web server costs.

    python bench/engine_users.py --users 8 --repeats 2 --out bench/results/engine_users
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.users_workload import SINK, WINDOW, add_workload_arguments, message  # noqa: E402
from lckv_stream import buckets, engine as engine_module  # noqa: E402
from lckv_stream.chat import CacheSettings, ChatSession, TokenEvent  # noqa: E402
from lckv_stream.chat_format import ChatFormat  # noqa: E402
from lckv_stream.engine import Engine, EngineSettings  # noqa: E402
from lckv_stream.loading import load_model  # noqa: E402
from lckv_stream.sampling import SamplingSettings  # noqa: E402


class EngineClock:
    """Seconds and calls of the engine's steps (per batch class), prefills and iterations."""

    def __init__(self) -> None:
        self.seconds: collections.Counter = collections.Counter()
        self.calls: collections.Counter = collections.Counter()
        self._timed(buckets.Bucket, "step", lambda args: f"step, class {args[0]}")
        self._timed(engine_module.Engine, "_prefill_chunk", lambda args: "prefill")
        self._timed(engine_module.Engine, "_take", lambda args: "commands (snapshots, restores, ...)")
        self._timed(engine_module.Engine, "_finish", lambda args: "handing out tokens")
        self._timed(buckets.Bucket, "swap", lambda args: "row swaps")
        self._timed(engine_module.Engine, "_iteration", lambda args: "iterations")

    def _timed(self, owner: type, name: str, label) -> None:
        original = getattr(owner, name)

        def timed(this, *args, **kwargs):
            began = time.perf_counter()
            try:
                return original(this, *args, **kwargs)
            finally:
                key = label(args)
                self.seconds[key] += time.perf_counter() - began
                self.calls[key] += 1

        setattr(owner, name, timed)

    def reset(self) -> None:
        self.seconds.clear()
        self.calls.clear()

    def split(self) -> dict:
        """Each part's seconds and calls; "other scheduler work" is what the iterations spent outside them."""
        parts = {k: {"seconds": s, "calls": self.calls[k]} for k, s in sorted(self.seconds.items())}
        # Swaps run inside a step's launch but not inside Bucket.step: counted apart from it.
        inside = sum(s for k, s in self.seconds.items() if k != "iterations")
        parts["other scheduler work"] = {"seconds": self.seconds["iterations"] - inside,
                                         "calls": self.calls["iterations"]}
        return parts


def conversation(model, tokenizer, engine: Engine, name: str, turns: int, settings: SamplingSettings) -> int:
    session = ChatSession(model, tokenizer, cache_settings=CacheSettings(SINK, WINDOW), engine=engine)
    tokens = 0
    for turn in range(turns):
        for event in session.send(message(name, turn), settings):
            tokens += isinstance(event, TokenEvent)
    session.close()
    return tokens


def run(model, tokenizer, engine: Engine, users: int, turns: int, settings: SamplingSettings, tag: str) -> float:
    counts = [0] * users

    def work(i: int) -> None:
        counts[i] = conversation(model, tokenizer, engine, f"user-{tag}-{i}", turns, settings)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(users)]
    began = time.perf_counter()
    [thread.start() for thread in threads]
    [thread.join() for thread in threads]
    return sum(counts) / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(parser)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, "cpu")
    sink = max(SINK, ChatFormat(tokenizer).pinned_prefix_length(None))
    engine = Engine(model, EngineSettings.for_device(model.device, max_batch=max(args.users), warm_shape=(sink, WINDOW)))
    settings = SamplingSettings(temperature=0.7, top_p=0.9, max_new_tokens=args.max_new_tokens)
    clock = EngineClock()
    while engine.stats().compiling:  # the compiled steps first: a compile takes the same cores
        run(model, tokenizer, engine, 1, 1, settings, "warm")
        time.sleep(2.0)
    run(model, tokenizer, engine, 1, 1, settings, "warm")
    rows = []
    for repeat in range(args.repeats):
        for users in [1, *args.users]:
            clock.reset()
            speed = run(model, tokenizer, engine, users, args.turns, settings, str(repeat))
            rows.append({"users": users, "tokens_per_s": speed, "engine_time": clock.split()})
            print(f"{users} user(s): {speed:.1f} tokens/s", flush=True)
    alone = statistics.median(r["tokens_per_s"] for r in rows if r["users"] == 1)
    print(f"\nModel {args.model} on {torch.get_num_threads()} threads; {args.turns} turns of "
          f"{args.max_new_tokens} new tokens per user; medians of {args.repeats} interleaved runs")
    print("| users at once | aggregate tokens/s | vs one user |")
    print("|---|---|---|")
    for users in [1, *args.users]:
        speed = statistics.median(r["tokens_per_s"] for r in rows if r["users"] == users)
        print(f"| {users} | {speed:.1f} | {speed / alone:.2f}x |")
    print("\nThe engine's thread, last run of each size (seconds in all / calls / ms a call):")
    print("| users | part | seconds | calls | ms a call |")
    print("|---|---|---|---|---|")
    for users in [1, *args.users]:
        last = [r for r in rows if r["users"] == users][-1]
        for part, spent in last["engine_time"].items():
            calls = max(1, spent["calls"])
            print(f"| {users} | {part} | {spent['seconds']:.2f} | {spent['calls']} | {spent['seconds'] / calls * 1e3:.1f} |")
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "engine_users.json").write_text(json.dumps({"model": args.model, "runs": rows}, indent=1))
    engine.close()


if __name__ == "__main__":
    main()
