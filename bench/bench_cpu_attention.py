"""One layer's decode attention on a CPU: the CPU kernel (`torch.ops.lckv.decode_attention`) against
torch's fused attention as the "torch" backend calls it, on the default model's shapes (9 query heads
on 3 KV heads of 64, a cache of sink 16 + window 1,024 with a row sink of 4).

Each call cycles through `--buffers` separate key/value buffers (21: the default model's producer
layers), so that, as in a step, they do not all sit in the CPU's caches. Time is the process's CPU
time (the best of 5 repeats), which a shared machine disturbs less than the wall clock.

    python bench/bench_cpu_attention.py --batch 1 8 --threads 1
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from lckv_stream import int8_kernel  # noqa: E402

HEADS, ROWS, DIM, SINK, WINDOW, ROW_SINK = 3, 3, 64, 16, 1024, 4


def cpu_time_ms(call, repeats: int = 5, calls: int = 20) -> float:
    call()
    best = float("inf")
    for _ in range(repeats):
        began = time.process_time()
        for _ in range(calls):
            call()
        best = min(best, (time.process_time() - began) / calls * 1e3)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--buffers", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if not int8_kernel.available():
        raise SystemExit(f"no CPU kernel here: {int8_kernel.unavailable_reason()}")
    torch.set_num_threads(args.threads)
    slots = SINK + WINDOW
    print("| batch | K/V | torch attention, ms/layer | kernel, ms/layer | ratio |\n|---|---|---|---|---|")
    for batch in args.batch:
        for dtype in (torch.float32, torch.bfloat16):
            query = torch.randn(batch, HEADS, ROWS, DIM)
            keys = [torch.randn(batch, HEADS, slots, DIM).to(dtype) for _ in range(args.buffers)]
            values = [torch.randn(batch, HEADS, slots, DIM).to(dtype) for _ in range(args.buffers)]
            visible = torch.ones(batch, slots, dtype=torch.bool)
            visible[:, ROW_SINK:SINK] = False  # the buffer's sink slots the row does not use
            mask = visible[:, None, None, :].repeat(1, 1, ROWS, 1)
            kernel = cpu_time_ms(lambda: [torch.ops.lckv.decode_attention(query, k, v, visible)
                                          for k, v in zip(keys, values)]) / args.buffers
            name = str(dtype).removeprefix("torch.")
            if dtype != torch.float32:  # torch's attention wants one dtype: a bfloat16 cache is the kernel's alone
                print(f"| {batch} | {name} | — | {kernel:.3f} | — |")
                continue
            reference = cpu_time_ms(lambda: [F.scaled_dot_product_attention(query, k, v, attn_mask=mask)
                                             for k, v in zip(keys, values)]) / args.buffers
            print(f"| {batch} | {name} | {reference:.3f} | {kernel:.3f} | {reference / kernel:.2f}x |")


if __name__ == "__main__":
    main()
