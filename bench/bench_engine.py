"""The serving engine under load: many conversations at once, many more open, start-up, a soak.

Parts (each prints a table and writes JSON into --out):
  concurrency  1, 8, 32, 64 conversations generating at once through the engine API (different
               prompts, lengths and windows within one bucket; then once in mixed buckets):
               aggregate tokens/s, per-stream ms/token, time to first token of a conversation that
               joins under load, GPU memory; the raw batched step of each batch class in the same
               run, for the ratio engine / raw
  resume       1,000 open conversations, most offloaded to host memory: time to bring one back
               to the device, memory on both sides, re-encodings (none unless the budget dropped)
  start        engine start to first token, with a cold and then a warm on-disk compile cache
               (two child processes), and compiles counted on the hot path afterwards
  soak         64 conversations x --turns turns each: memory and latency per block of turns
  profile      where a step's time goes: kernels on the device against wall time per step, with
               1 and 64 conversations generating (torch.profiler over a window mid-run)
  host         the scheduler alone: the same conversations with a step that does no model work
               (tokens drawn as zeros, no forward pass), so the rate is the ceiling the engine's
               host work per step sets at each batch size (any device; `--model tiny` is enough)

    python -m bench.bench_engine --model random --out bench/results/engine            # GPU
    python -m bench.bench_engine --model tiny --parts concurrency --counts 1 4 --tokens 16   # CPU dry run
    python -m bench.bench_engine --model tiny --parts host                                    # host ceiling
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from lckv_stream.engine import Engine, EngineSettings
from lckv_stream.memory import freeze_startup_objects
from lckv_stream.sampling import SamplingSettings

VOCAB = 49152
STARTED = time.monotonic()  # the process's start, for --wall-seconds


def build_model(kind: str):
    """'random': SmolLM2-135M's shape and the default model's layer map, random weights; 'default':
    the shipped model; 'tiny': a small random model (CPU dry runs)."""
    cuda = torch.cuda.is_available()
    if kind == "tiny":
        from app_support.tiny import tiny_model
        from lckv_stream import cla_map

        return tiny_model(cla_map(4), vocab_size=VOCAB)
    if kind == "default":
        from lckv_stream.loading import load_model

        return load_model("default", "cuda" if cuda else "cpu")[0]
    from transformers import LlamaConfig, LlamaForCausalLM

    from lckv_stream.convert import convert_llama
    from lckv_stream.default_model import default_layer_types

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, tie_word_embeddings=True)
    dense = LlamaForCausalLM(config)
    if cuda:
        dense = dense.to("cuda", torch.bfloat16)
    return convert_llama(dense, default_layer_types())


def gpu_mb() -> float | None:
    return torch.cuda.memory_allocated() / 2**20 if torch.cuda.is_available() else None


def wait_compiled(engine: Engine, timeout_s: float) -> float:
    started = time.perf_counter()
    while engine.stats().compiling and time.perf_counter() - started < timeout_s:
        time.sleep(0.5)
        engine.stats()  # installing happens between steps: nudge an idle engine
        engine._call(lambda: None)
    return time.perf_counter() - started


def conversation(engine: Engine, window: int, prompt_tokens: int, new_tokens: int, seed: int,
                 start: threading.Barrier | None, out: dict, go: threading.Barrier | None = None) -> None:
    """One conversation: read a prompt, generate `new_tokens`; records its timings in `out`. With
    `go`, generation starts once every conversation has read its prompt (decode measured alone)."""
    rng = random.Random(seed)
    row = engine.open_row(4, window, seed=seed)
    prompt = [rng.randrange(3, VOCAB) for _ in range(prompt_tokens)]
    if start is not None:
        start.wait()
    began = time.perf_counter()
    list(engine.prefill(row, prompt, 256, threading.Event()))
    if go is not None:
        go.wait()
    settings = SamplingSettings(temperature=0.8, top_k=50, top_p=0.95, max_new_tokens=new_tokens)
    stream, fed = engine.generate(row, settings, frozenset(), threading.Event())
    latencies = []
    first = None
    for _, latency in stream:
        if first is None:
            first = time.perf_counter()
        latencies.append(latency)
    out.update(began=began, first=first, end=time.perf_counter(), tokens=len(fed), latencies=latencies,
               ttft_ms=(first - began) * 1e3)
    engine.close_row(row)


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else float("nan")


def run_concurrent(engine: Engine, count: int, windows: list[int], new_tokens: int, seed: int) -> dict:
    """`count` conversations at once, and one more joining mid-way (its time to first token)."""
    results = [dict() for _ in range(count)]
    barrier, go = threading.Barrier(count), threading.Barrier(count + 1)
    threads = [threading.Thread(target=conversation, args=(
        engine, windows[i % len(windows)], 100 + (i * 37) % 300, new_tokens, seed + i, barrier, results[i], go))
        for i in range(count)]
    [t.start() for t in threads]
    go.wait()
    before = engine.stats()
    joiner = {}
    if count > 1:
        time.sleep(0.05)  # the others are generating now: a new conversation reads 100 tokens
        conversation(engine, windows[0], 100, 4, seed + 10_000, None, joiner)
    [t.join() for t in threads]
    after = engine.stats()
    began = min(r["first"] for r in results)
    ended = max(r["end"] for r in results)
    steps = max(1, after.steps - before.steps)
    tokens = sum(r["tokens"] - 1 for r in results)  # tokens after each stream's first
    per_stream = [statistics.median(r["latencies"][1:]) for r in results if len(r["latencies"]) > 1]
    return {
        "conversations": count,
        "windows": sorted(set(windows[: count])),
        "aggregate_tokens_per_s": tokens / (ended - began),
        "per_stream_ms_per_token": statistics.median(per_stream),
        # Slow steps the median hides (the aggregate counts them): the mean and the 99th percentile.
        "token_ms_mean": statistics.fmean(x for r in results for x in r["latencies"][1:]),
        "token_ms_p99": _percentile([x for r in results for x in r["latencies"][1:]], 0.99),
        "ttft_ms_alone": statistics.median(r["ttft_ms"] for r in results) if count == 1 else None,
        "ttft_ms_joining_under_load": joiner.get("ttft_ms"),
        "gpu_mb": gpu_mb(),
        # Whether the streams really ran together: rows per step, steps skipped for a lagging
        # reader, and how far apart the streams started and ended (ms after the first token).
        "rows_per_step": (after.tokens - before.tokens) / steps,
        "held_back_per_step": (after.held_back - before.held_back) / steps,
        "last_first_token_ms": (max(r["first"] for r in results) - began) * 1e3,
        "first_end_ms": (min(r["end"] for r in results) - began) * 1e3,
    }


def raw_step_ms(engine: Engine, window: int, size: int, steps: int = 200) -> float:
    """The bucket's captured step for batch class `size` alone, timed on the engine's thread."""
    from lckv_stream.buckets import bucket_shape

    def measure() -> float:
        bucket = engine._bucket(bucket_shape(4, window))
        decoder = bucket.decoder(size)
        tokens = torch.zeros(size, dtype=torch.long, device=engine.device)
        saved = bucket.cache.snapshot()
        for _ in range(10):
            decoder.step(tokens)
        if engine.device.type == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps):
                decoder.step(tokens)
            stop.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(stop) / steps
        else:
            began = time.perf_counter()
            for _ in range(steps):
                decoder.step(tokens)
            elapsed = (time.perf_counter() - began) * 1e3 / steps
        bucket.cache.restore(saved)
        return elapsed

    return engine._call(measure)


def step_name(engine: Engine, window: int, rows: int) -> str:
    """What runs the step of `rows` generating rows in that window's bucket (compiled or not)."""
    from lckv_stream.buckets import batch_class, bucket_shape

    return engine._call(lambda: engine._bucket(bucket_shape(4, window)).decoder_name(batch_class(rows)))


def part_concurrency(engine: Engine, args) -> dict:
    rows = []
    same_bucket = [1024, 1000, 960, 900]
    for count in args.counts:
        rows.append(run_concurrent(engine, count, same_bucket, args.tokens, seed=count))
        rows[-1]["decoder"] = step_name(engine, 1024, count)
    # Raw steps before the mixed run: its new buckets start compiling on the side.
    raw = {size: raw_step_ms(engine, 1024, size) for size in args.counts}
    if args.mixed:
        mixed = run_concurrent(engine, max(args.counts), [256, 1024, 4096, 2048], args.tokens, seed=99)
        mixed["mixed_buckets"] = True
        rows.append(mixed)
    for row in rows:
        if not row.get("mixed_buckets"):
            size = row["conversations"]
            row["raw_step_ms"] = raw[size]
            row["raw_tokens_per_s"] = size / raw[size] * 1e3
            row["engine_over_raw"] = row["aggregate_tokens_per_s"] / row["raw_tokens_per_s"]
    for row in rows:
        print(f"  {row['conversations']} conversations: token interval mean {row['token_ms_mean']:.3f} ms, "
              f"99th percentile {row['token_ms_p99']:.3f} ms")
    print("| conversations | buckets | aggregate tok/s | per-stream ms/token | raw step ms | engine / raw | "
          "TTFT joining under load | GPU MB | rows a step | held back a step | streams' spread (last start / first end) | step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['conversations']} | {'mixed ' + str(row['windows']) if row.get('mixed_buckets') else 'one'} | "
              f"{row['aggregate_tokens_per_s']:,.0f} | {row['per_stream_ms_per_token']:.3f} | "
              f"{row.get('raw_step_ms', float('nan')):.3f} | {row.get('engine_over_raw', float('nan')):.2f} | "
              f"{row['ttft_ms_joining_under_load'] or row['ttft_ms_alone'] or 0:.1f} ms | {row['gpu_mb'] or 0:,.0f} | "
              f"{row['rows_per_step']:.1f} | {row['held_back_per_step']:.2f} | "
              f"{row['last_first_token_ms']:.0f} / {row['first_end_ms']:.0f} ms | {row.get('decoder', '')} |")
    return {"rows": rows, "raw_step_ms": raw}


def part_host(model, args) -> dict:
    """Conversations through an engine whose steps skip the model: what the scheduler alone allows."""
    engine = Engine(model, EngineSettings.for_device(model.device, compile=False, graphs=False, max_batch=64,
                                                     overlap_steps=True, cpu_fast=False, warm_shape=(4, 1024)))

    def hollow() -> None:
        from lckv_stream.buckets import bucket_shape

        bucket = engine._bucket(bucket_shape(4, 1024))
        zeros = torch.zeros(bucket.rows + 1, dtype=torch.long, device=engine.device)
        logits = bucket.next_logits
        bucket._sample = lambda size, widths: zeros[:size]
        for size in bucket.classes:
            bucket.decoder(size).step = lambda tokens, size=size: logits[:size]

    engine._call(hollow)
    rows = []
    for count in args.counts:
        result = run_concurrent(engine, count, [1024], args.tokens, seed=count)
        result["host_us_per_step"] = count / result["aggregate_tokens_per_s"] * 1e6
        result["host_us_per_row"] = result["host_us_per_step"] / count
        rows.append(result)
    print("| conversations | tokens/s (no model work) | host µs per step | per row | rows a step | held back a step |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['conversations']} | {row['aggregate_tokens_per_s']:,.0f} | {row['host_us_per_step']:,.0f} | "
              f"{row['host_us_per_row']:.1f} | {row['rows_per_step']:.1f} | {row['held_back_per_step']:.2f} |")
    engine.close()
    return {"rows": rows}


def part_profile(engine: Engine, args) -> dict:
    """Device kernel time against wall time per engine step, mid-run, at each of --profile-counts."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    rows = []
    for count in args.profile_counts:
        # Long enough replies that the window falls mid-run.
        runner = threading.Thread(target=run_concurrent, args=(engine, count, [1024], max(args.tokens, 1000), count))
        runner.start()
        started = time.perf_counter()
        while engine.stats().generating < count and time.perf_counter() - started < 60:
            time.sleep(0.01)
        time.sleep(0.1)
        steps_before, began = engine.stats().steps, time.perf_counter()
        with profile(activities=activities) as prof:
            time.sleep(0.3)
        wall, steps = time.perf_counter() - began, engine.stats().steps - steps_before
        runner.join()
        kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        busy_us = sum(e.time_range.elapsed_us() for e in kernels)
        names: dict[str, float] = {}
        for e in kernels:
            names[e.name] = names.get(e.name, 0.0) + e.time_range.elapsed_us()
        top = sorted(names.items(), key=lambda item: -item[1])[:8]
        rows.append({"conversations": count, "steps": steps, "wall_ms_per_step": wall * 1e3 / max(steps, 1),
                     "kernel_ms_per_step": busy_us / 1e3 / max(steps, 1), "kernels_per_step": len(kernels) / max(steps, 1),
                     "top_kernels_ms_per_step": {name[:80]: us / 1e3 / max(steps, 1) for name, us in top}})
    print("| conversations | wall ms per step | device kernels ms per step | kernels per step |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['conversations']} | {row['wall_ms_per_step']:.3f} | {row['kernel_ms_per_step']:.3f} | "
              f"{row['kernels_per_step']:.0f} |")
        for name, ms in row["top_kernels_ms_per_step"].items():
            print(f"|   | {name} | {ms:.3f} | |")
    return {"rows": rows}


def part_resume(engine: Engine, args) -> dict:
    """Open `args.open` conversations of each length in `args.open_tokens` (short ones; ones that
    fill the 1,024 window, whose host copies are whole rows), then bring 100 back from host memory."""
    import psutil

    results = []
    print("| open | tokens each | on device | on host | dropped | resume ms (median / max) | host MB (held / reserved) | GPU MB | RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for length in args.open_tokens:
        rows = [engine.open_row(4, 1024, seed=i) for i in range(args.open)]
        for i, row in enumerate(rows):
            prompt = [3 + (i + k * 7) % 1000 for k in range(length)]
            list(engine.prefill(row, prompt, 256, threading.Event()))
        stats = engine.stats()
        hosted = [row for row in rows if row.residence == "host"]
        sample = random.Random(0).sample(hosted, min(100, len(hosted)))
        times = [engine.make_resident(row) * 1e3 for row in sample]
        result = {
            "open": args.open, "tokens_each": length, "on_device": stats.rows_on_device,
            "on_host": stats.rows_on_host, "dropped": stats.rows_lost, "host_mb": stats.host_mb,
            "host_reserved_mb": stats.host_reserved_mb, "gpu_mb": gpu_mb(),
            "rss_mb": psutil.Process().memory_info().rss / 2**20,
            "resume_ms_median": statistics.median(times), "resume_ms_max": max(times),
            "re_encoded": sum(row.lost for row in rows),
        }
        results.append(result)
        print(f"| {result['open']} | {length} | {result['on_device']} | {result['on_host']} | {result['dropped']} | "
              f"{result['resume_ms_median']:.2f} / {result['resume_ms_max']:.2f} | "
              f"{result['host_mb']:,.0f} / {result['host_reserved_mb']:,.0f} | "
              f"{result['gpu_mb'] or 0:,.0f} | {result['rss_mb']:,.0f} |")
        for row in rows:
            engine.close_row(row)
    return {"runs": results}


def part_soak(engine: Engine, args) -> dict:
    count, turns = args.soak_conversations, args.turns
    per_turn = [[] for _ in range(turns)]
    memory = []
    errors = []
    # a soak cut short still reports its turns; --wall-seconds counts from the process's start
    deadline = min(time.monotonic() + args.soak_seconds, STARTED + args.wall_seconds)
    done = [0] * count
    began = time.perf_counter()

    def converse(i: int) -> None:
        try:
            rng = random.Random(i)
            row = engine.open_row(4, 1024, seed=i)
            settings = SamplingSettings(temperature=0.8, max_new_tokens=8)
            for turn in range(turns):
                if time.monotonic() > deadline:
                    return
                done[i] = turn
                list(engine.prefill(row, [rng.randrange(3, VOCAB) for _ in range(20)], 256, threading.Event()))
                stream, fed = engine.generate(row, settings, frozenset(), threading.Event())
                latencies = [latency for _, latency in stream]
                per_turn[turn].extend(latencies[1:])
        except Exception as error:  # reported below
            errors.append(repr(error))

    threads = [threading.Thread(target=converse, args=(i,)) for i in range(count)]
    [t.start() for t in threads]
    while any(t.is_alive() for t in threads):
        memory.append(gpu_mb())
        if len(memory) % 30 == 0:
            print(f"  {time.perf_counter() - began:.0f} s: turns done {min(done)}..{max(done)}", flush=True)
        time.sleep(1.0)
    assert not errors, errors[:3]
    wall = time.perf_counter() - began
    turns = min(turns, min(done) + 1) if time.monotonic() > deadline else turns
    print(f"{count} conversations x {turns} turns in {wall:.0f} s "
          f"({count * turns / wall:.0f} turns/s, {sum(map(len, per_turn[:turns])) / wall:,.0f} tokens/s after each turn's first)")
    block = max(1, turns // 10)
    blocks = [statistics.median([x for t in per_turn[b : b + block] for x in t]) for b in range(0, turns, block)]
    overall = statistics.median(blocks)
    print("| block of turns | median ms/token | vs median |")
    print("|---|---|---|")
    for index, value in enumerate(blocks):
        print(f"| {index * block}-{index * block + block - 1} | {value:.3f} | {value / overall - 1:+.1%} |")
    seen = [m for m in memory if m is not None]
    print(f"GPU MB over the soak: {min(seen) if seen else 0:,.0f} .. {max(seen) if seen else 0:,.0f}")
    return {"conversations": count, "turns": turns, "wall_s": wall, "blocks_ms": blocks, "gpu_mb": memory}


def part_start(args) -> dict:
    """Engine start to first token in a child process: a cold compile cache, then the same warm."""
    import tempfile

    folder = tempfile.mkdtemp(prefix="lckv-inductor-")
    results = {}
    for label in args.start_caches:
        # cold: an empty compile cache; warm: the one the cold run filled (alone: the engine's own)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if "cold" in args.start_caches:
            env["TORCHINDUCTOR_CACHE_DIR"] = folder
        command = [sys.executable, __file__, "--model", args.model, "--parts", "start-child",
                   "--compile-classes", *map(str, args.compile_classes)]
        output = subprocess.run(command, env=env, capture_output=True, text=True, timeout=590)
        line = [x for x in output.stdout.splitlines() if x.startswith("{")]
        results[label] = json.loads(line[-1]) if line else {"error": output.stderr[-2000:]}
    print("| compile cache | engine ready s | first token s | all compiled s | compiles after warm-up |")
    print("|---|---|---|---|---|")
    for label, r in results.items():
        if "error" in r:
            print(f"| {label} | failed: {r['error'][-300:]} |")
            continue
        print(f"| {label} | {r['ready_s']:.1f} | {r['first_token_s']:.1f} | {r['compiled_s']:.1f} | {r['hot_path_builds']} |")
    return results


def part_start_child(args) -> None:
    started = time.perf_counter()
    model = build_model(args.model)
    loaded = time.perf_counter()
    engine = Engine(model, EngineSettings.for_device(model.device, warm_shape=(4, 1024),
                                                     compiled_classes=tuple(args.compile_classes)))
    ready = time.perf_counter()
    row = engine.open_row(4, 1024, seed=0)
    list(engine.prefill(row, list(range(3, 103)), 256, threading.Event()))
    list(engine.generate(row, SamplingSettings(temperature=0, max_new_tokens=1), frozenset(), threading.Event())[0])
    first = time.perf_counter()
    wait_compiled(engine, 580 - (first - started))
    compiled = time.perf_counter()
    before = (engine.counters.decoders_built, engine.counters.graphs_captured)
    run_concurrent(engine, 8, [1024, 1000], 16, seed=1)
    after = (engine.counters.decoders_built, engine.counters.graphs_captured)
    print(json.dumps({"load_s": loaded - started, "ready_s": ready - loaded, "first_token_s": first - loaded,
                      "compiled_s": compiled - loaded, "compiles": engine.counters.compiles_finished,
                      "hot_path_builds": after[0] - before[0] + after[1] - before[1],
                      "decoder": engine.decoder_name(row)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=("random", "default", "tiny"), default="random")
    parser.add_argument("--parts", nargs="+", default=["concurrency", "resume", "start", "soak"],
                        choices=("concurrency", "resume", "start", "soak", "host", "profile", "start-child"))
    parser.add_argument("--counts", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--profile-counts", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--tokens", type=int, default=256, help="new tokens per conversation")
    parser.add_argument("--open", type=int, default=1000, help="open conversations for the resume part")
    parser.add_argument("--open-tokens", nargs="+", type=int, default=[8, 1028],
                        help="tokens each open conversation holds (1,028: sinks and window full, a whole row to copy)")
    parser.add_argument("--soak-conversations", type=int, default=64)
    parser.add_argument("--turns", type=int, default=500)
    parser.add_argument("--soak-seconds", type=float, default=float("inf"),
                        help="end the soak after this long (the turns every conversation finished are reported)")
    parser.add_argument("--wall-seconds", type=float, default=float("inf"),
                        help="end the soak this long after the process started (whatever the parts before it took)")
    parser.add_argument("--compile-classes", nargs="+", type=int, default=[1, 8, 32, 64])
    parser.add_argument("--compile-timeout", type=float, default=480)
    parser.add_argument("--mixed", action=argparse.BooleanOptionalAction, default=True,
                        help="the concurrency part's run in mixed buckets (new buckets compile on the side)")
    parser.add_argument("--start-caches", nargs="+", choices=("cold", "warm"), default=["cold", "warm"])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.parts == ["start-child"]:
        part_start_child(args)
        return
    results: dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
                     "model": args.model}
    engine = None
    if set(args.parts) - {"start", "host"}:
        model = build_model(args.model)
        began = time.perf_counter()
        engine = Engine(model, EngineSettings.for_device(model.device, warm_shape=(4, 1024),
                                                         compiled_classes=tuple(args.compile_classes)))
        results["engine_ready_s"] = time.perf_counter() - began
        results["compiled_after_s"] = wait_compiled(engine, args.compile_timeout) + results["engine_ready_s"]
        freeze_startup_objects()  # as the app does: no full garbage collection stalls the measured steps
        print(f"engine ready in {results['engine_ready_s']:.1f} s, compiled steps in {results['compiled_after_s']:.1f} s: "
              f"{engine.decoder_name(engine.open_row(4, 1024))}")
    for part in args.parts:
        print(f"\n## {part}")
        if part == "concurrency":
            results[part] = part_concurrency(engine, args)
        elif part == "resume":
            results[part] = part_resume(engine, args)
        elif part == "soak":
            results[part] = part_soak(engine, args)
        elif part == "start":
            results[part] = part_start(args)
        elif part == "profile":
            results[part] = part_profile(engine, args)
        elif part == "host":
            results[part] = part_host(build_model(args.model), args)
        if engine is not None:
            results["counters"] = vars(engine.counters)
        if args.out:  # after every part: a run cut short keeps what it measured
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "engine.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
