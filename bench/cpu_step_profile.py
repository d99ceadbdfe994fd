"""Where the engine's compiled CPU decode step spends its time, at 1 and at 8 rows: ms per step, then
the step's operations by total time under torch.profiler (the int8 products, the decode attention,
Inductor's fused kernels, allocations), and one message read as the engine does it, eager (8 rows
of --read-tokens tokens in one call, then one row alone).

The default model, the engine's default cache (sink 4 + window 1,024), each row holding about
--context tokens. The steps are the engine's own (compiled on its side compiler: minutes the first
time, seconds from the on-disk cache), called on the engine's thread while it has nothing else to do.

    python bench/cpu_step_profile.py
    python bench/cpu_step_profile.py --rows 8 --top 12
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from lckv_stream.engine import Engine, EngineSettings  # noqa: E402
from lckv_stream.loading import load_model  # noqa: E402
from lckv_stream.memory import freeze_startup_objects  # noqa: E402


def timed_ms(work, repeats: int) -> float:
    """Median wall-clock ms of `work()` over `repeats` calls, after two untimed ones."""
    for _ in range(2):
        work()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        work()
        times.append((time.perf_counter() - began) * 1e3)
    return statistics.median(times)


def operations(work, calls: int, top: int) -> list[tuple[str, int, float]]:
    """(name, calls per `work`, ms per `work`) of the `top` operations by total time."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            work()
    events = sorted(prof.key_averages(), key=lambda event: -event.cpu_time_total)
    return [(event.key, event.count // calls, event.cpu_time_total / calls / 1e3) for event in events[:top]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context", type=int, default=300, help="tokens each row holds first")
    parser.add_argument("--read-tokens", type=int, default=28, help="tokens of each message read")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per batch size")
    parser.add_argument("--top", type=int, default=10, help="operations listed per profile")
    parser.add_argument("--compile-timeout", type=float, default=1200)
    args = parser.parse_args()
    model = load_model("default", "cpu")[0]
    engine = Engine(model, EngineSettings.for_device(model.device, max_batch=max(args.rows), warm_shape=(4, 1024)))
    began = time.perf_counter()
    while engine.stats().compiling and time.perf_counter() - began < args.compile_timeout:
        engine._call(lambda: None)  # compiled steps are installed between iterations
        time.sleep(0.5)
    freeze_startup_objects()
    rows = [engine.open_row(4, 1024, seed=i) for i in range(max(args.rows))]
    for i, row in enumerate(rows):
        list(engine.prefill(row, [(7 * i + j) % 40000 + 3 for j in range(args.context)], 256, threading.Event()))
    bucket = rows[0].bucket
    generator = torch.Generator().manual_seed(0)
    report: list[str] = []

    def measure() -> None:  # on the engine's thread: it owns the rows and the compiled steps
        for size in args.rows:
            decoder = bucket.decoder(size)
            step = functools.partial(decoder.step, torch.randint(3, 40000, (size, 1), generator=generator))
            with torch.inference_mode():
                ms = timed_ms(step, args.steps)
                ops = operations(step, 10, args.top)
            report.append(f"\n{size} row(s): {type(decoder).__name__}, {ms:.2f} ms a step (median of {args.steps})")
            report.append("| operation | calls a step | ms a step |\n|---|---|---|")
            report.extend(f"| {name[:90]} | {calls} | {ms:.2f} |" for name, calls, ms in ops)

    engine._call(measure)
    print(f"Default model, engine's CPU step; about {args.context} tokens held per row; "
          f"{torch.get_num_threads()} threads" + "".join(f"\n{line}" for line in report))
    # Reading messages as the engine does (eager), after the steps: 8 rows of --read-tokens in one
    # call, then one row alone; wall-clock medians (these write into the rows: measured last).
    for size in sorted({1, max(args.rows)}, reverse=True):
        pieces = [[(11 * i + j) % 40000 + 3 for j in range(args.read_tokens)] for i in range(size)]
        if size > 1:
            sequential = engine.step_model.encodes_sequentially(args.read_tokens)
            work = functools.partial(bucket.prefill_rows, rows[0].index, pieces, sequential)
        else:
            work = functools.partial(bucket.prefill, rows[0].index, torch.tensor(pieces))
        read = functools.partial(engine._call, work)
        print(f"read {size} x {args.read_tokens} tokens in one call: {timed_ms(read, 5):.1f} ms (median of 5)")
    engine.close()


if __name__ == "__main__":
    main()
