"""The engine's decode step on a CPU with 1 and with 8 conversations generating, the default model,
each conversation holding about --context tokens: ms per step (median of --rounds rounds of
--tokens steps each, after the compiled steps are installed), and the 8-row step against 8 single
steps. With --amx both, the same rows step with AMX on and off in turn (int8_kernel.use_amx), so the
two are measured side by side in one process.

    python bench/cpu_batch_steps.py
    python bench/cpu_batch_steps.py --amx both --rounds 5

To compare two versions of the code, run it in each checkout in turn (`git worktree add`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lckv_stream import int8_kernel  # noqa: E402
from lckv_stream.engine import Engine, EngineSettings  # noqa: E402
from lckv_stream.loading import load_model  # noqa: E402
from lckv_stream.memory import freeze_startup_objects  # noqa: E402
from lckv_stream.sampling import SamplingSettings  # noqa: E402


def ms_per_step(engine: Engine, rows: list, tokens: int) -> float:
    """Every row generates `tokens` tokens at once; wall ms per engine step."""
    def generate(row) -> None:
        stream, _ = engine.generate(row, SamplingSettings(temperature=0.7, max_new_tokens=tokens), frozenset(),
                                    threading.Event())
        for _ in stream:
            pass

    threads = [threading.Thread(target=generate, args=(row,)) for row in rows]
    steps, began = engine.stats().steps, time.perf_counter()
    [thread.start() for thread in threads]
    [thread.join() for thread in threads]
    return (time.perf_counter() - began) * 1e3 / max(1, engine.stats().steps - steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=300, help="tokens each conversation holds first")
    parser.add_argument("--tokens", type=int, default=64, help="steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--amx", choices=("on", "off", "both"), default="on")
    parser.add_argument("--compile-timeout", type=float, default=1200)
    args = parser.parse_args()
    model = load_model("default", "cpu")[0]
    engine = Engine(model, EngineSettings.for_device(model.device, warm_shape=(4, 1024)))
    began = time.perf_counter()
    while engine.stats().compiling and time.perf_counter() - began < args.compile_timeout:
        engine._call(lambda: None)  # compiled steps are installed between iterations
        time.sleep(0.5)
    freeze_startup_objects()
    supported = int8_kernel.use_amx(True)  # False where the CPU or the OS has no AMX
    modes = {"on": [True], "off": [False], "both": [True, False]}[args.amx]
    results: dict[tuple[bool, int], list[float]] = {}
    for count in (1, 8):
        rows = [engine.open_row(4, 1024, seed=i) for i in range(count)]
        for i, row in enumerate(rows):
            list(engine.prefill(row, [(7 * i + j) % 40000 + 3 for j in range(args.context)], 256, threading.Event()))
        for _ in range(args.rounds):
            for amx in modes:
                int8_kernel.use_amx(amx)
                results.setdefault((amx, count), []).append(ms_per_step(engine, rows, args.tokens))
        for row in rows:
            engine.close_row(row)
    int8_kernel.use_amx(True)
    print(f"{engine.decoder_name(engine.open_row(4, 1024))}; about {args.context} tokens held per conversation; "
          f"medians of {args.rounds} rounds of {args.tokens} steps")
    print("| int8 products | 1 row, ms a step | 8 rows, ms a step | 8 rows against 8 single steps |")
    print("|---|---|---|---|")
    for amx in modes:
        one, eight = (statistics.median(results[(amx, count)]) for count in (1, 8))
        name = "AMX from 4 rows, VNNI below" if amx and supported else "VNNI"
        print(f"| {name} | {one:.2f} | {eight:.2f} | {8 * one / eight:.2f}x |")
    engine.close()


if __name__ == "__main__":
    main()
