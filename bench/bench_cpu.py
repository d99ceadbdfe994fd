"""CPU decode speed and memory, side by side on this machine, in one run:

  llama.cpp     `llama-bench` (built from source, CPU only) on the base GGUF the default model was
                made from (SmolLM2-135M-Instruct, Q4_1): generation of 64 tokens after a context of
                each length (`-p 0 -n 64 -d LENGTH -t THREADS`), and prompt processing of 100
                tokens after 1,024 (`-p 100 -n 0 -d 1024`)
  transformers  `generate` on the dense base model (float32, its default dynamic cache), greedy
  ours, float32 the default model through `ChatSession` and the engine, float32 eager steps
                (LCKV_CPU_FAST=0: how it ran before the fast path)
  ours, fast    the same with the CPU fast path (the default): int8 weights on the VNNI kernel,
                the batch-1 step compiled on the engine's side compiler (waited for and timed
                before measuring: `compile_s`)

Decode tokens/s after conversations of 100 / 1k / 4k / 50k tokens (ours: a user message of that
many tokens, really encoded, then a greedy reply of 64 tokens: the engine's own per-token times,
sampling included; transformers stops at its trained context, 8,192), time to first token of a
100-token turn after 1k tokens, peak RSS and KV cache MB. Each system runs in its own process; the
systems take turns, `--repeats` times, and each number is the median over repeats.

llama.cpp is built once into ~/.cache/lckv-stream/llama.cpp (or `--llama-bench PATH`): the sources
are the ones vendored in the `llama-cpp-python` sdist on PyPI (`pip download --no-binary :all:
--no-deps llama-cpp-python`), built with `cmake -B build -DLLAMA_CURL=OFF -DGGML_NATIVE=ON` and
`cmake --build build --target llama-bench` (needs cmake and a C++ compiler).

    python bench/bench_cpu.py --out bench/results/cpu
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LENGTHS = [100, 1024, 4096, 50_000]
TRAINED_CONTEXT = 8192
NEW_TOKENS = 64
TURN_TOKENS = 100  # the turn whose time to first token is measured, after TTFT_AFTER tokens
TTFT_AFTER = 1024
SYSTEMS = ["llama.cpp", "transformers", "ours-fp32", "ours-fast"]
LABELS = {
    "llama.cpp": "llama.cpp (Q4_1 GGUF, dense cache)",
    "transformers": "transformers generate (float32, dense cache)",
    "ours-fp32": "ours, float32 eager (before)",
    "ours-fast": "ours, CPU fast path (int8 VNNI, compiled)",
}


# ---- llama.cpp ------------------------------------------------------------------------------------
def llama_bench_path(cache: Path) -> Path:
    """llama-bench built from the llama.cpp sources vendored in the llama-cpp-python sdist (once)."""
    found = sorted(cache.glob("llama_cpp_python-*/vendor/llama.cpp/build/bin/llama-bench"))
    if found:
        return found[-1]
    cache.mkdir(parents=True, exist_ok=True)
    print(f"building llama-bench in {cache} (once; a few minutes) ...", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                    "llama-cpp-python", "-d", str(cache)], check=True)
    archive = sorted(cache.glob("llama_cpp_python-*.tar.gz"))[-1]
    with tarfile.open(archive) as tar:
        tar.extractall(cache, filter="data")
    source = sorted(cache.glob("llama_cpp_python-*/vendor/llama.cpp"))[-1]
    subprocess.run(["cmake", "-B", "build", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DCMAKE_BUILD_TYPE=Release"],
                   cwd=source, check=True)
    subprocess.run(["cmake", "--build", "build", "--target", "llama-bench", f"-j{os.cpu_count() or 2}"],
                   cwd=source, check=True)
    return source / "build" / "bin" / "llama-bench"


def run_llama_bench(binary: Path, gguf: Path, args: list[str]) -> tuple[list[dict], float]:
    """llama-bench's JSON records, and the peak RSS (MB) of its process."""
    wrapper = ("import resource, subprocess, sys; out = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
               "sys.stderr.write(out.stderr[-2000:]); print(out.stdout);"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(out.returncode)")
    result = subprocess.run([sys.executable, "-c", wrapper, str(binary), "-m", str(gguf), "-o", "json", "-r", "1",
                             *args], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"llama-bench {' '.join(args)} failed: {result.stderr[-1500:]}")
    *report, peak_kb = result.stdout.strip().splitlines()
    return json.loads("\n".join(report)), int(peak_kb) / 1024


def llama_cpp(binary: Path, gguf: Path, lengths: list[int], threads: int) -> dict:
    out: dict = {"decode_tok_s": {}, "peak_rss_mb": 0.0}
    for length in lengths:
        records, peak = run_llama_bench(binary, gguf, ["-p", "0", "-n", str(NEW_TOKENS), "-d", str(length),
                                                       "-t", str(threads)])
        out["decode_tok_s"][str(length)] = records[0]["avg_ts"]
        out["peak_rss_mb"] = max(out["peak_rss_mb"], peak)
        # A dense f16 cache: 30 layers x (K + V) x 3 heads x 64 x 2 bytes for every token.
        out.setdefault("cache_mb", {})[str(length)] = (length + NEW_TOKENS) * 30 * 2 * 3 * 64 * 2 / 2**20
    records, _ = run_llama_bench(binary, gguf, ["-p", str(TURN_TOKENS), "-n", "0", "-d", str(TTFT_AFTER),
                                                "-t", str(threads)])
    out["prompt_tok_s"] = records[0]["avg_ts"]
    out["ttft_ms"] = 1e3 * TURN_TOKENS / records[0]["avg_ts"]  # the prompt alone; its first token is one step more
    records, _ = run_llama_bench(binary, gguf, ["-p", "0", "-n", str(NEW_TOKENS), "-t", str(threads)])
    out["decode_tok_s_empty"] = records[0]["avg_ts"]  # the command: no context at all
    out["build"] = f"{records[0].get('build_commit', '')} ({records[0].get('cpu_info', '')})"
    return out


# ---- text -----------------------------------------------------------------------------------------
def long_text(tokenizer, tokens: int) -> str:
    """About `tokens` tokens of real prose: this repository's documentation, repeated as needed."""
    source = "\n\n".join(path.read_text() for path in [ROOT / "README.md", ROOT / "bench" / "RESULTS.md",
                                                         ROOT / "assets" / "smollm2-135m-kv21" / "README.md"])
    ids = tokenizer(source, add_special_tokens=False)["input_ids"]
    ids = (ids * (tokens // len(ids) + 1))[:tokens]
    return tokenizer.decode(ids)


# ---- ours -----------------------------------------------------------------------------------------
def ours(fast: bool, lengths: list[int]) -> dict:
    os.environ["LCKV_CPU_FAST"] = "1" if fast else "0"
    import torch

    from lckv_stream.chat import ChatSession, TurnEnd
    from lckv_stream.loading import load_model
    from lckv_stream.metrics import process_rss_mb
    from lckv_stream.sampling import SamplingSettings

    model, tokenizer = load_model("default", "cpu", progress=lambda _: None)
    settings = SamplingSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=NEW_TOKENS)
    began = time.perf_counter()
    chat = ChatSession(model, tokenizer, sampling=settings)  # the engine quantizes on the fast path

    def reply(message: str):
        return next(e for e in chat.send(message) if isinstance(e, TurnEnd))

    reply("Hello!")  # makes the bucket; on the fast path its batch-1 step compiles on the side
    while chat.engine.stats().compiling:
        time.sleep(0.5)
    out: dict = {"decoder": chat.stats().decoder, "compile_s": time.perf_counter() - began,
                 "threads": torch.get_num_threads(), "decode_tok_s": {}, "new_tokens": {}, "conversation": {}}
    ask = "\n\nWhat is this text about? Answer in detail."

    for length in lengths:
        chat.clear()
        end = reply(long_text(tokenizer, length - len(tokenizer(ask)["input_ids"])) + ask)
        out["decode_tok_s"][str(length)] = end.metrics.tokens_per_s
        out["new_tokens"][str(length)] = end.metrics.new_tokens
        out["conversation"][str(length)] = chat.stats().conversation_tokens
        if length == TTFT_AFTER:
            turn = reply(long_text(tokenizer, TURN_TOKENS - 12))  # the chat template adds about 12 tokens
            out["ttft_ms"], out["ttft_prompt_tokens"] = turn.metrics.ttft_ms, turn.metrics.prompt_tokens
    stats = chat.stats()
    out["cache_mb"] = stats.cache.allocated_mb
    out["rss_mb"] = process_rss_mb()
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


# ---- transformers ---------------------------------------------------------------------------------
def transformers_generate(lengths: list[int]) -> dict:
    import torch
    from transformers import DynamicCache

    from lckv_stream.base_model import load_base

    model, tokenizer = load_base("cpu", torch.float32, progress=lambda _: None)
    out: dict = {"decode_tok_s": {}, "cache_mb": {}, "threads": torch.get_num_threads()}
    greedy = dict(do_sample=False, pad_token_id=tokenizer.eos_token_id, eos_token_id=None)
    for length in lengths:
        if length + NEW_TOKENS > TRAINED_CONTEXT:
            continue
        ids = tokenizer(long_text(tokenizer, length), return_tensors="pt", add_special_tokens=False)["input_ids"][:, :length]
        with torch.inference_mode():
            timings = {}
            for new in (1, NEW_TOKENS + 1):
                began = time.perf_counter()
                generated = model.generate(ids, max_new_tokens=new, min_new_tokens=new, **greedy,
                                           return_dict_in_generate=True)
                timings[new] = time.perf_counter() - began
        out["decode_tok_s"][str(length)] = NEW_TOKENS / (timings[NEW_TOKENS + 1] - timings[1])
        cache = generated.past_key_values
        out["cache_mb"][str(length)] = sum(t.numel() * t.element_size() for layer in cache.layers
                                           for t in (layer.keys, layer.values)) / 2**20
    # Time to first token of a 100-token turn after 1,024 tokens held in its cache.
    text = tokenizer(long_text(tokenizer, TTFT_AFTER + TURN_TOKENS), return_tensors="pt",
                     add_special_tokens=False)["input_ids"]
    past_ids, turn = text[:, :TTFT_AFTER], text[:, TTFT_AFTER : TTFT_AFTER + TURN_TOKENS]
    samples = []
    with torch.inference_mode():
        for _ in range(3):
            cache = DynamicCache(config=model.config)
            model(past_ids, past_key_values=cache, use_cache=True)
            began = time.perf_counter()
            model(turn, past_key_values=cache, use_cache=True, logits_to_keep=1).logits[:, -1].argmax(-1)
            samples.append((time.perf_counter() - began) * 1e3)
    out["ttft_ms"] = statistics.median(samples)
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


# ---- the run --------------------------------------------------------------------------------------
def worker(system: str, lengths: list[int]) -> dict:
    if system == "transformers":
        return transformers_generate(lengths)
    return ours(system == "ours-fast", lengths)


def in_process(system: str, lengths: list[int]) -> dict:
    command = [sys.executable, __file__, "--worker", system, "--lengths", *map(str, lengths)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"{system} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def median_of(runs: list[dict], *keys: str) -> float | None:
    values = []
    for run in runs:
        value = run
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        if value is not None:
            values.append(value)
    return statistics.median(values) if values else None


def table(results: dict, lengths: list[int]) -> str:
    return _table(results, lengths) + "\n" + "\n".join(ratios(results))


def _table(results: dict, lengths: list[int]) -> str:
    head = " | ".join(f"{length:,} tok" for length in lengths)
    lines = [f"| system | decode tokens/s: {head} | TTFT of a {TURN_TOKENS}-token turn after 1k, ms | peak RSS MB | KV cache MB (1k / {lengths[-1]:,}) |",
             "|---|" + "---|" * len(lengths) + "---|---|---|"]
    for system, runs in results["runs"].items():
        speeds = []
        for length in lengths:
            value = median_of(runs, "decode_tok_s", str(length))
            speeds.append("—" if value is None else f"{value:.1f}")
        ttft = median_of(runs, "ttft_ms")
        cache = runs[0].get("cache_mb")
        if isinstance(cache, dict):
            cache_text = " / ".join(f"{cache[str(n)]:.1f}" if str(n) in cache else "—" for n in (1024, lengths[-1]))
        else:
            cache_text = f"{cache:.1f} (fixed)"
        lines.append(f"| {LABELS[system]} | " + " | ".join(speeds) + f" | {ttft:.0f} | {median_of(runs, 'peak_rss_mb'):.0f} | {cache_text} |")
    notes = []
    for system, runs in results["runs"].items():
        loads = ", ".join(f"{run['load_before']:.1f}" for run in runs)
        note = f"- {LABELS[system]}: {len(runs)} runs, load average before each {loads}"
        if "decoder" in runs[0]:
            compile_s = ", ".join(f"{run['compile_s']:.0f}" for run in runs)
            note += f"; steps: {runs[0]['decoder']}; ready (first reply and side compile) after {compile_s} s"
        notes.append(note)
    return "\n".join(lines + [""] + notes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--systems", nargs="+", default=SYSTEMS, choices=SYSTEMS)
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (torch uses its default)")
    parser.add_argument("--long-systems", nargs="*", default=["ours-fast"], choices=SYSTEMS,
                        help="systems that also run the lengths past the trained context (8,192)")
    parser.add_argument("--llama-bench", type=Path, help="a llama-bench binary (default: build one, once)")
    parser.add_argument("--worker", choices=SYSTEMS, help=argparse.SUPPRESS)  # internal: one system, JSON out
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.lengths)))
        return
    from lckv_stream.base_model import cache_dir, fetch_base_gguf

    gguf = fetch_base_gguf(progress=print)
    binary = None
    if "llama.cpp" in args.systems:
        binary = args.llama_bench or llama_bench_path(cache_dir() / "llama.cpp")
    results: dict = {"lengths": args.lengths, "new_tokens": NEW_TOKENS, "threads": args.threads,
                     "date": time.strftime("%Y-%m-%d %H:%M"), "cpu": _cpu_name(), "runs": {s: [] for s in args.systems}}
    for repeat in range(args.repeats):
        for system in args.systems:
            load = os.getloadavg()[0]
            began = time.perf_counter()
            # Past the trained context only the systems in --long-systems run: llama.cpp's dense
            # prompt of 50k tokens alone took over 20 minutes on this machine.
            lengths = [n for n in args.lengths if n <= TRAINED_CONTEXT or system in args.long_systems]
            if system == "llama.cpp":
                run = llama_cpp(binary, gguf, lengths, args.threads)
            else:
                run = in_process(system, lengths)
            run["load_before"], run["seconds"] = load, time.perf_counter() - began
            results["runs"][system].append(run)
            speeds = ", ".join(f"{k}: {v:.1f}" for k, v in run["decode_tok_s"].items())
            print(f"repeat {repeat + 1} {system}: decode tok/s {speeds}; TTFT {run['ttft_ms']:.0f} ms "
                  f"({run['seconds']:.0f} s, load {load:.1f})", flush=True)
        if args.out:
            _save(args.out, results, args.lengths)
    _save(args.out, results, args.lengths) if args.out else None
    print("\n" + table(results, args.lengths))


def ratios(results: dict) -> list[str]:
    """Our fast path against llama.cpp at each length, and how flat it stays from 1k to the longest."""
    runs, lengths, lines = results["runs"], results["lengths"], []
    if "ours-fast" not in runs:
        return lines
    if "llama.cpp" in runs:
        for length in lengths:
            ours_speed = median_of(runs["ours-fast"], "decode_tok_s", str(length))
            theirs = median_of(runs["llama.cpp"], "decode_tok_s", str(length))
            if ours_speed and theirs:
                lines.append(f"- ours / llama.cpp at {length:,} tokens: {ours_speed / theirs:.2f}")
        empty = median_of(runs["llama.cpp"], "decode_tok_s_empty")
        lines.append(f"- ours at 1,024 / llama.cpp with no context (`-p 0 -n 64`, {empty:.1f} tokens/s): "
                     f"{median_of(runs['ours-fast'], 'decode_tok_s', '1024') / empty:.2f}")
        prompt = median_of(runs["llama.cpp"], "prompt_tok_s")
        lines.append(f"- llama.cpp prompt processing after 1k: {prompt:.0f} tokens/s")
    if 1024 in lengths and lengths[-1] > 1024:
        first = median_of(runs["ours-fast"], "decode_tok_s", "1024")
        last = median_of(runs["ours-fast"], "decode_tok_s", str(lengths[-1]))
        lines.append(f"- ours at {lengths[-1]:,} / ours at 1,024: {last / first:.2f}")
    return lines


def _save(folder: Path, results: dict, lengths: list[int]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "bench_cpu.json").write_text(json.dumps(results, indent=1))
    (folder / "table.md").write_text(table(results, lengths) + "\n")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} CPUs"
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs"


if __name__ == "__main__":
    main()
