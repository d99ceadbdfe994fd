"""The compiled CPU step with and without Dynamo's guards on the model's modules, side by side.

Before each call of a compiled function Dynamo checks its guards: with the model's modules guarded,
that is a check per module and parameter (hundreds for the default model) at every token. The engine
compiles the CPU step without them (`cpu_fast.CPU_COMPILE_OPTIONS`); this measures what that saves:
the default model's CPU fast path, 1 and 8 rows holding --context tokens, ms per step (median of
--rounds rounds of --steps steps, the two versions alternating), in one process.

    python bench/cpu_step_guards.py [--rounds 5] [--steps 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lckv_stream.attention import choose_attention_backend  # noqa: E402
from lckv_stream.cpu_fast import CPU_COMPILE_OPTIONS, cpu_fast_model, fast_path_name, use_cpu_threads  # noqa: E402
from lckv_stream.decoding import compile_step  # noqa: E402
from lckv_stream.loading import load_model  # noqa: E402


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()
    use_cpu_threads()
    fast = cpu_fast_model(load_model("default", "cpu", progress=lambda _: None)[0])
    guarded = {key: value for key, value in CPU_COMPILE_OPTIONS.items() if key != "guard_filter_fn"}
    # Without module guards compile_step compiles a private copy of the step's code, so the two
    # versions do not share Dynamo's per-code list of compiled versions.
    versions = {"modules guarded": compile_step(guarded),
                "no module guards (engine)": compile_step(CPU_COMPILE_OPTIONS)}
    results: dict[tuple[str, int], list[float]] = {}
    for rows in (1, 8):
        cache = fast.new_cache(4, 1024, batch_size=rows)
        choose_attention_backend(cache)
        fast(torch.randint(3, 40000, (rows, args.context)), cache)
        token = torch.randint(3, 40000, (rows, 1))
        for step in versions.values():  # compile (or load from the disk cache) and warm up
            for _ in range(3):
                step(fast, token, cache)
        for _ in range(args.rounds):
            for name, step in versions.items():
                began = time.perf_counter()
                for _ in range(args.steps):
                    step(fast, token, cache)
                results.setdefault((name, rows), []).append((time.perf_counter() - began) * 1e3 / args.steps)
    print(f"{fast_path_name()}, {torch.get_num_threads()} threads, about {args.context} tokens held per row; "
          f"median of {args.rounds} rounds of {args.steps} steps")
    print("| step | 1 row ms | 8 rows ms |\n|---|---|---|")
    for name in versions:
        print(f"| {name} | " + " | ".join(f"{statistics.median(results[(name, rows)]):.2f}" for rows in (1, 8)) + " |")


if __name__ == "__main__":
    main()
