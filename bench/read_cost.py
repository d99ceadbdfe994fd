"""What one row's read of a short message costs in the engine (run on the device it serves):
messages of a few lengths read alone, one captured prefill chunk replayed, the row copies a read
through the spare row makes, and `Bucket.prefill` as a whole.

    PYTHONPATH=. python bench/read_cost.py            # random weights of the default model's shape, plain graphs
    PYTHONPATH=. python bench/read_cost.py --compile  # after the side compiler's steps and prefill chunks
    PYTHONPATH=. python bench/read_cost.py --profile  # also: where a 4- and a 16-token Bucket.prefill spend their time

On a GPU this is what sets how many rows may read in one scheduler iteration while others generate.
With --compile it also fills the compile cache for the benchmarks run after it on the same machine.
"""

from __future__ import annotations

import argparse
import threading
import time

import torch

from bench.bench_engine import build_model
from lckv_stream.buckets import bucket_shape
from lckv_stream.engine import Engine, EngineSettings


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed_ms(function, repeats: int = 50) -> float:
    synchronize()
    began = time.perf_counter()
    with torch.inference_mode():  # as the engine runs them: graph inputs are inference tensors
        for _ in range(repeats):
            function()
    synchronize()
    return (time.perf_counter() - began) / repeats * 1e3


def profile_prefill(bucket, ids: torch.Tensor, repeats: int = 20) -> None:
    """The operations and kernels of `repeats` reads of `ids` into row 0, per read: host time
    (what the engine's thread spends) and device time, largest first."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.cuda.is_available()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    timed_ms(lambda: bucket.prefill(0, ids), repeats=3)  # warm
    with profile(activities=activities) as prof:
        timed_ms(lambda: bucket.prefill(0, ids), repeats=repeats)
    events = prof.key_averages()
    print(f"\n{ids.shape[1]}-token Bucket.prefill, per read ({repeats} reads):")
    if cuda:
        kernels = sum(e.count for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")) / repeats
        print(f"kernels a read: {kernels:.0f}")
    print("| operation | host ms | device ms | calls |\n|---|---|---|---|")
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    for event in sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:18]:
        device_us = getattr(event, "self_device_time_total", 0) if cuda else 0
        print(f"| {event.key[:70]} | {event.cpu_time_total / 1e3 / repeats:.3f} | {device_us / 1e3 / repeats:.3f} | "
              f"{event.count / repeats:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compile", action="store_true", help="compile as the server does (classes 1, 8, 32, 64)")
    parser.add_argument("--compile-timeout", type=float, default=520)
    parser.add_argument("--profile", action="store_true", help="profile Bucket.prefill of 4 and 16 tokens (torch.profiler)")
    args = parser.parse_args()
    model = build_model("random")
    began = time.perf_counter()
    engine = Engine(model, EngineSettings.for_device(model.device, compile=args.compile, warm_shape=(4, 1024),
                                                     compiled_classes=(1, 8, 32, 64)))
    while args.compile and engine.stats().compiling and time.perf_counter() - began < args.compile_timeout:
        engine._call(lambda: None)  # compiled work is installed between iterations
        time.sleep(0.5)
    if args.compile:
        counters = engine.counters
        print(f"compiled {counters.compiles_finished} of {counters.compiles_started} (steps and prefill chunks) "
              f"in {time.perf_counter() - began:.0f} s ({counters.compile_seconds:.0f} s of compiling)")
    bucket = engine._buckets[bucket_shape(4, 1024)]
    decoder = bucket._prefill_decoder
    print(f"device {model.device}; prefill decoder: {decoder.name if decoder else 'eager'}")
    for what, error in bucket.compile_errors.items():
        print(f"--- {what} did not compile or install:\n{error}\n---")
    row = engine.open_row(4, 1024, seed=0)
    print("| what | ms |\n|---|---|")
    for count in (20, 20, 100, 16, 4):
        began = time.perf_counter()
        list(engine.prefill(row, list(range(5, 5 + count)), 256, threading.Event()))
        synchronize()
        print(f"| a {count}-token message read alone | {(time.perf_counter() - began) * 1e3:.2f} |")
    ids = torch.arange(16, device=model.device).view(1, 16)
    if decoder is not None and getattr(decoder, "_prefill_graphs", None):
        print(f"| one captured 16-token chunk | {engine._call(lambda: timed_ms(lambda: decoder._replay_prefill(ids))):.3f} |")
    print(f"| a row's state to host memory and back (packed) | "
          f"{engine._call(lambda: timed_ms(lambda: bucket.cache.load_row(1, bucket.cache.row_state(0, pin=model.device.type == 'cuda')))):.3f} |")
    print(f"| a row copied to the spare row | {engine._call(lambda: timed_ms(lambda: bucket.cache.copy_row(0, bucket.spare))):.3f} |")
    print(f"| Bucket.prefill of 16 tokens | {engine._call(lambda: timed_ms(lambda: bucket.prefill(0, ids))):.3f} |")
    if args.profile:
        for length in (4, 16):
            engine._call(lambda length=length: profile_prefill(bucket, ids[:, :length]))
    engine.close()


if __name__ == "__main__":
    main()
