"""One quantized product of the default model's shapes alone, int8 against int4 on the VNNI kernels:
time per call and the weight bytes read per second (the quantized weights with their scales).
"int8" takes AMX for 4 rows or more where the CPU has it; "int8-vnni" is the same product with AMX
off (both give the same floats), side by side.

A decode step reads about 134 MB of int8 weights, which no core's L2 holds, so each call here reads
a different copy of the weights, in turn, from enough copies to fill `--megabytes` (as the step
reads them: from L3, or memory). Each number is the median over `--calls` calls; two threads unless
`--threads` says otherwise.

    python bench/quantized_products.py
    python bench/quantized_products.py --shapes 49152x576 --batches 1 --calls 200
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lckv_stream import int4_kernel, int8_kernel  # noqa: E402
from lckv_stream.quantize import QuantizedLinear  # noqa: E402

FORMATS = {"int8": ("int8", 32), "int8-vnni": ("int8", 32), "int4-g32": ("int4", 32), "int4-g64": ("int4", 64)}


def weight_bytes(layer: QuantizedLinear) -> int:
    """What one call reads of the layer: its buffers (weights, scales, sums)."""
    return sum(buffer.numel() * buffer.element_size() for buffer in layer.buffers())


def measure(rows: int, columns: int, fmt: str, batch: int, calls: int, megabytes: float) -> tuple[float, float]:
    """Median us per call and GB/s of weight bytes over `calls` calls cycling through copies."""
    weights, group = FORMATS[fmt]
    first = QuantizedLinear(torch.randn(rows, columns) * 0.05, None, weights, group, vnni=True)
    copies = max(1, int(megabytes * 1e6 // weight_bytes(first)))
    layers = [first] + [QuantizedLinear(torch.randn(rows, columns) * 0.05, None, weights, group, vnni=True)
                        for _ in range(min(copies, 64) - 1)]
    x = torch.randn(batch, columns)
    times = []
    amx = int8_kernel.use_amx(fmt != "int8-vnni")
    with torch.inference_mode():
        for index in range(calls + len(layers)):
            layer = layers[index % len(layers)]
            began = time.perf_counter()
            layer(x)
            if index >= len(layers):  # the first round warms up
                times.append(time.perf_counter() - began)
    int8_kernel.use_amx(True)
    if fmt == "int8" and batch >= 4 and not amx:
        print(f"(no AMX here: {fmt} at batch {batch} is VNNI)", flush=True)
    median = statistics.median(times)
    return median * 1e6, weight_bytes(first) / median / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["3072x576", "1536x576", "576x1536", "49152x576"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8, 32])
    parser.add_argument("--formats", nargs="+", default=["int8", "int8-vnni", "int4-g32"], choices=list(FORMATS))
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--megabytes", type=float, default=64.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not int4_kernel.available():
        raise SystemExit("the VNNI kernels are not available here")
    print("| product (N x K) | batch | " + " | ".join(f"{f} us (GB/s)" for f in args.formats) + " |")
    print("|---|---|" + "---|" * len(args.formats))
    for shape in args.shapes:
        rows, columns = map(int, shape.split("x"))
        for batch in args.batches:
            cells = [measure(rows, columns, fmt, batch, args.calls, args.megabytes) for fmt in args.formats]
            print(f"| {rows} x {columns} | {batch} | " + " | ".join(f"{us:.0f} ({gbs:.1f})" for us, gbs in cells)
                  + " |", flush=True)


if __name__ == "__main__":
    main()
