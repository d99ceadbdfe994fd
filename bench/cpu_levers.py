"""What each lever of the CPU decode path is worth, one at a time: ms/token at batch 1 after 1,024
tokens of conversation, the default model, the engine's default cache (sink 4 + window 1,024, in its
bucket's buffer of sink 16), and the time to encode a 100-token turn on top.

Each variant runs in its own process (threads, compiled code and memory do not leak between
them); the variants are run in turn, `--rounds` times, and each number is the median over rounds
of the median step time of a round (the machine is shared, so rounds are interleaved).

    python bench/cpu_levers.py --out bench/results/cpu/levers.json
    python bench/cpu_levers.py --variants fp32 int8+compile --rounds 5 --out /tmp/levers.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name -> what it changes against the float32 eager step the engine used on a CPU before. "quant":
# weight format and kernel; "dtype": activations and cache; "compile": the step compiled as the
# engine's side compiler does (cpu_fast.CPU_COMPILE_OPTIONS); "attention": "torch" steps with torch's
# attention instead of the CPU decode-attention kernel (the "cpu" backend, on wherever it builds).
VARIANTS: dict[str, dict] = {
    "fp32": {},
    "fp32, 1 thread": {"threads": 1},
    "fp32, fused q/k/v and gate/up": {"fuse": True},
    "bf16 weights and cache": {"dtype": "bfloat16", "fuse": True},
    "int8 (torch kernel), bf16": {"quant": "int8-torch", "dtype": "bfloat16"},
    "int4-g32 (torch kernel), bf16": {"quant": "int4-g32-torch", "dtype": "bfloat16"},
    "int8 VNNI, fp32": {"quant": "int8"},
    "int8 VNNI, fp32, torch attention": {"quant": "int8", "attention": "torch"},
    "int8 VNNI, bf16": {"quant": "int8", "dtype": "bfloat16"},
    "fp32 + compile": {"fuse": True, "compile": True},
    "int8 (torch kernel), bf16 + compile": {"quant": "int8-torch", "dtype": "bfloat16", "compile": True},
    "int8 VNNI, fp32 + compile": {"quant": "int8", "compile": True},
    "int8 VNNI, fp32 + compile, torch attention": {"quant": "int8", "compile": True, "attention": "torch"},
    "int8 VNNI, bf16 + compile": {"quant": "int8", "dtype": "bfloat16", "compile": True},
    "int4-g32 VNNI, fp32": {"quant": "int4-g32"},
    "int4-g64 VNNI, fp32": {"quant": "int4-g64"},
    "int4-g32 VNNI, head int4, fp32": {"quant": "int4-g32-head4"},
    "int4-g32 MLP VNNI, fp32": {"quant": "int4-g32-attn8"},
    "int4-g32 VNNI, fp32 + compile": {"quant": "int4-g32", "compile": True},
    "int4-g64 VNNI, fp32 + compile": {"quant": "int4-g64", "compile": True},
    "int4-g32 VNNI, head int4, fp32 + compile": {"quant": "int4-g32-head4", "compile": True},
    "int4-g32 MLP VNNI, fp32 + compile": {"quant": "int4-g32-attn8", "compile": True},
}


def quantization(spec: str):
    """Settings from e.g. "int8", "int4-g32-torch" (torch's kernel), "int4-g32-head4" (the head in
    int4 too; otherwise int8), "int4-g64-attn8" (attention projections in int8: int4 in the MLP)."""
    from lckv_stream.quantize import QuantizationSettings

    parts = spec.split("-")
    kernel = "torch" if "torch" in parts else "auto"
    head = "int4" if "head4" in parts else "int8"
    attention = "int8" if "attn8" in parts else None
    group = next((int(part[1:]) for part in parts if part.startswith("g")), 32)
    return QuantizationSettings(parts[0], head, group, kernel, attention)


def measure(spec: dict, context: int, steps: int, batch: int, threads: int | None = None) -> dict:
    """Build the variant, fill its cache with `context` tokens, time `steps` decode steps."""
    import torch

    sys.path.insert(0, str(ROOT))
    from lckv_stream.attention import choose_attention_backend
    from lckv_stream.cpu_fast import CPU_COMPILE_OPTIONS, CompiledCPUDecoder, use_cpu_threads
    from lckv_stream.decoding import EagerDecoder, compile_step
    from lckv_stream.fusion import fuse_projections
    from lckv_stream.loading import load_model
    from lckv_stream.quantize import quantized_copy

    from lckv_stream.base_model import cache_dir

    if spec.get("attention") == "torch":
        os.environ["LCKV_CPU_ATTENTION"] = "0"
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))  # as the engine has it
    threads = spec.get("threads", threads)
    torch.set_num_threads(threads) if threads else use_cpu_threads()
    dtype = getattr(torch, spec.get("dtype", "float32"))
    model, _ = load_model("default", "cpu", progress=lambda _: None)
    began = time.perf_counter()
    if "quant" in spec:
        model = quantized_copy(model, quantization(spec["quant"]), dtype)
    else:
        model = model.to(dtype)
        if spec.get("fuse"):
            fuse_projections(model)
    # The engine's bucket for the default sink 4 + window 1,024: a buffer of sink 16, the row set to 4.
    cache = model.new_cache(16, 1024, batch_size=batch)
    for row in range(batch):
        cache.set_row_size(row, 4, 1024)
    decoder = EagerDecoder(model, cache)
    if spec.get("compile"):  # compiled as the engine's side compiler does (the same disk cache)
        step = compile_step(CPU_COMPILE_OPTIONS)
        scratch = model.new_cache(16, 1024, batch_size=batch)
        choose_attention_backend(scratch)
        with torch.inference_mode():
            step(model, torch.zeros(batch, 1, dtype=torch.long), scratch)
        decoder = CompiledCPUDecoder(model, cache, step, "compiled")
    build_s = time.perf_counter() - began
    ids = torch.randint(0, model.config.vocab_size, (batch, context), generator=torch.Generator().manual_seed(0))
    for start in range(0, context, 256):
        decoder.prefill(ids[:, start : start + 256])
    token = torch.zeros(batch, dtype=torch.long)
    for _ in range(5):
        decoder.step(token)
    times = []
    for _ in range(steps):
        began_step = time.perf_counter()
        decoder.step(token)
        times.append((time.perf_counter() - began_step) * 1e3)
    prefill_ms = []
    for _ in range(3):  # a 100-token turn encoded on top of the context (what time to first token waits for)
        saved = cache.snapshot()
        began_step = time.perf_counter()
        decoder.prefill(ids[:, :100])
        prefill_ms.append((time.perf_counter() - began_step) * 1e3)
        cache.restore(saved)
    return {"ms": statistics.median(times), "min_ms": min(times), "build_s": build_s,
            "prefill_100_ms": statistics.median(prefill_ms),
            "decoder": getattr(decoder, "name", "eager"), "attention": cache.attention_backend,
            "threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch threads of every variant (default: the CPUs available)")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one variant, print JSON
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(VARIANTS[args.one], args.context, args.steps, args.batch, args.threads)))
        return
    runs: dict[str, list[dict]] = {name: [] for name in args.variants}
    for round_index in range(args.rounds):
        for name in args.variants:
            command = [sys.executable, __file__, "--one", name, "--context", str(args.context),
                       "--steps", str(args.steps), "--batch", str(args.batch)]
            command += ["--threads", str(args.threads)] if args.threads else []
            output = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
            if output.returncode != 0:
                raise SystemExit(f"{name} failed:\n{output.stderr[-3000:]}")
            result = json.loads(output.stdout.strip().splitlines()[-1])
            result["load"] = os.getloadavg()[0]
            runs[name].append(result)
            print(f"round {round_index + 1} {name}: {result['ms']:.2f} ms/token (min {result['min_ms']:.2f}, "
                  f"built in {result['build_s']:.1f} s, {result['decoder']}, {result['attention']} attention, "
                  f"load {result['load']:.1f})", flush=True)
    summary = {name: {"ms": statistics.median(r["ms"] for r in rounds), "rounds": rounds}
               for name, rounds in runs.items()}
    baseline = summary.get("fp32", {}).get("ms")
    print("\n| lever | ms/token (tokens/s) | vs fp32 | 100-token prefill, ms |\n|---|---|---|---|")
    for name, entry in summary.items():
        speedup = f"{baseline / entry['ms']:.2f}x" if baseline else ""
        prefill = statistics.median(r["prefill_100_ms"] for r in entry["rounds"])
        print(f"| {name} | {entry['ms']:.2f} ({1e3 / entry['ms']:.0f}) | {speedup} | {prefill:.0f} |")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"context": args.context, "batch": args.batch, "steps": args.steps,
                                        "threads": args.threads,
                                        "variants": summary}, indent=1))


if __name__ == "__main__":
    main()
