"""What one token's matrix product and one grid barrier cost as Triton kernels (GPU), side by side.

The fused decode step (`lckv_stream/fused_step.py`) measured 2.6x slower than the compiled step on
an H100, its phases bound by latency: each program walks its inputs in 64-wide chunks one after
another. This isolates the choices for a product of x [rows, inputs] and W [outputs, inputs] (bf16
weights, float32 x), each launched over the GPU's multiprocessors as the persistent step would:

  rolled    each program: TILE output rows, a loop over 64-wide input chunks (what the step does)
  unrolled  the same loop unrolled at compile time (all chunks' loads may be in flight at once)
  whole     each program: TILE output rows, all inputs in one load (inputs padded to a power of 2)
  split     each program: TILE output rows x one chunk of the inputs, partial sums added with
            float32 atomics into a zeroed output (every program one round trip; order not fixed)

and cuBLAS (`torch.nn.functional.linear`) for scale. Shapes: the default model's o (576 x 576),
down (576 x 1536), gate/up (3072 x 576) and head (49152 x 576). Each kernel is replayed from a CUDA
graph of 50 launches, so launch gaps are spread out; each result is checked against a float32
product. Then a kernel of nothing but grid barriers, polling the counter with atomics or with
volatile loads: the floor of a persistent step's 151 barriers.

    python bench/fused_products.py [--rows 1 8] [--out bench/results/fused_products.json]
    python bench/fused_products.py --sass    # no GPU needed: each scheme compiled for sm_90, its
                                             # registers and the order of its loads and arithmetic
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from pathlib import Path

import torch
import triton
import triton.language as tl

SHAPES = {"o": (576, 576), "down": (576, 1536), "gate_up": (3072, 576), "head": (49152, 576)}
CHUNK = 64


@triton.jit
def _chunked(x, w, y, rows, OUTPUTS: tl.constexpr, INPUTS: tl.constexpr, TILE: tl.constexpr,
             ROWS: tl.constexpr, CHUNK: tl.constexpr, UNROLL: tl.constexpr):
    """The step's chunk loop (UNROLL 1), or unrolled by the compiler (UNROLL = the chunks)."""
    batch = tl.arange(0, ROWS)
    inputs = tl.arange(0, CHUNK)
    lanes = tl.arange(0, TILE)
    for item in range(tl.program_id(0), OUTPUTS // TILE, tl.num_programs(0)):
        out_rows = item * TILE + lanes
        acc = tl.zeros([ROWS, TILE], tl.float32)
        for start in tl.range(0, INPUTS, CHUNK, loop_unroll_factor=UNROLL):
            xs = tl.load(x + batch[:, None] * INPUTS + start + inputs[None, :], mask=(batch < rows)[:, None],
                         other=0.0, cache_modifier=".cg")
            ws = tl.load(w + out_rows[:, None] * INPUTS + start + inputs[None, :]).to(tl.float32)
            acc += tl.sum(xs[:, None, :] * ws[None, :, :], axis=2)
        tl.store(y + batch[:, None] * OUTPUTS + out_rows[None, :], acc, mask=(batch < rows)[:, None])


@triton.jit
def _whole(x, w, y, rows, OUTPUTS: tl.constexpr, INPUTS: tl.constexpr, TILE: tl.constexpr,
           ROWS: tl.constexpr, CHUNK: tl.constexpr, WIDTH: tl.constexpr):
    inputs = tl.arange(0, WIDTH)
    inside = inputs < INPUTS
    lanes = tl.arange(0, TILE)
    for item in range(tl.program_id(0), OUTPUTS // TILE, tl.num_programs(0)):
        out_rows = item * TILE + lanes
        ws = tl.load(w + out_rows[:, None] * INPUTS + inputs[None, :], mask=inside[None, :], other=0.0)
        for r in tl.static_range(0, ROWS):
            xs = tl.load(x + r * INPUTS + inputs, mask=inside & (inputs * 0 + r < rows), other=0.0,
                         cache_modifier=".cg")
            out = tl.sum(ws.to(tl.float32) * xs[None, :], axis=1)
            tl.store(y + r * OUTPUTS + out_rows, out, mask=lanes * 0 + r < rows)


@triton.jit
def _split(x, w, y, rows, OUTPUTS: tl.constexpr, INPUTS: tl.constexpr, TILE: tl.constexpr,
           ROWS: tl.constexpr, CHUNK: tl.constexpr):
    batch = tl.arange(0, ROWS)
    inputs = tl.arange(0, CHUNK)
    lanes = tl.arange(0, TILE)
    chunks = INPUTS // CHUNK
    for item in range(tl.program_id(0), (OUTPUTS // TILE) * chunks, tl.num_programs(0)):
        out_rows = (item // chunks) * TILE + lanes
        start = (item % chunks) * CHUNK
        xs = tl.load(x + batch[:, None] * INPUTS + start + inputs[None, :], mask=(batch < rows)[:, None],
                     other=0.0, cache_modifier=".cg")
        ws = tl.load(w + out_rows[:, None] * INPUTS + start + inputs[None, :]).to(tl.float32)
        part = tl.sum(xs[:, None, :] * ws[None, :, :], axis=2)
        tl.atomic_add(y + batch[:, None] * OUTPUTS + out_rows[None, :], part, mask=(batch < rows)[:, None],
                      sem="relaxed")


@triton.jit
def _barriers(counter, count, POLL_ATOMIC: tl.constexpr):
    """`count` grid barriers and nothing else (every program resident: grid <= multiprocessors)."""
    programs = tl.num_programs(0)
    for ordinal in range(1, count + 1):
        tl.debug_barrier()
        tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        target = ordinal * programs
        if POLL_ATOMIC:
            seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
            while seen < target:
                seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        else:
            seen = tl.load(counter, volatile=True)
            while seen < target:
                seen = tl.load(counter, volatile=True)
            tl.atomic_add(counter, 0, sem="acquire", scope="gpu")  # one acquire after the wait
        tl.debug_barrier()


def graph_us(launch, repeats: int = 50, rounds: int = 20) -> float:
    """Microseconds per launch: `repeats` launches captured in one CUDA graph, replayed `rounds` times."""
    for _ in range(3):
        launch()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeats):
            launch()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(rounds):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (rounds * repeats)


def products(rows: int, tile: int, programs: int) -> list[dict]:
    results = []
    rows_pow2 = triton.next_power_of_2(rows)
    for name, (outputs, inputs) in SHAPES.items():
        weight = torch.randn(outputs, inputs, device="cuda", dtype=torch.bfloat16) / inputs ** 0.5
        x = torch.randn(rows, inputs, device="cuda", dtype=torch.float32)
        want = x @ weight.float().t()
        y = torch.empty(rows, outputs, device="cuda", dtype=torch.float32)
        tile_here = tile
        x16 = x.to(torch.bfloat16)
        grid = (programs,)
        common = dict(OUTPUTS=outputs, INPUTS=inputs, TILE=tile_here, ROWS=rows_pow2, CHUNK=CHUNK)
        schemes = {
            "rolled": lambda: _chunked[grid](x, weight, y, rows, UNROLL=1, **common),
            "unrolled": lambda: _chunked[grid](x, weight, y, rows, UNROLL=inputs // CHUNK, **common),
            "whole": lambda: _whole[grid](x, weight, y, rows, WIDTH=triton.next_power_of_2(inputs), **common),
            "split": lambda: (y.zero_(), _split[grid](x, weight, y, rows, **common)),
            "cublas": lambda: torch.nn.functional.linear(x16, weight),
        }
        row = {"shape": name, "outputs": outputs, "inputs": inputs, "rows": rows, "tile": tile_here,
               "memory_floor_us": weight.numel() * 2 / 3.35e12 * 1e6}
        for scheme, launch in schemes.items():
            try:
                launch()
                torch.cuda.synchronize()
                if scheme != "cublas":
                    error = ((y - want).abs().max() / want.abs().max()).item()
                    if error > 1e-3:
                        raise AssertionError(f"relative error {error:.2e}")
                row[scheme] = graph_us(launch)
            except Exception as failure:  # one scheme failing leaves the others' numbers
                row[scheme] = f"failed: {str(failure).splitlines()[0][:120]}"
        print(row, flush=True)
        results.append(row)
    return results


def barriers(programs: int, count: int = 151) -> dict:
    counter = torch.zeros(1, dtype=torch.int32, device="cuda")
    row = {"programs": programs, "barriers": count}
    for poll in ("atomic", "volatile"):
        def launch():
            counter.zero_()
            _barriers[(programs,)](counter, count, POLL_ATOMIC=poll == "atomic")
        row[f"{poll}_us_per_barrier"] = graph_us(launch, repeats=10, rounds=10) / count
    print(row, flush=True)
    return row


def table(results: list[dict]) -> str:
    schemes = ["rolled", "unrolled", "whole", "split", "cublas"]
    lines = ["| product | rows | memory floor us | " + " | ".join(f"{s} us" for s in schemes) + " |",
             "|---|---|---|" + "---|" * len(schemes)]
    for row in results:
        cells = [f"{row[s]:.2f}" if isinstance(row[s], float) else row[s] for s in schemes]
        lines.append(f"| {row['shape']} {row['outputs']}x{row['inputs']} | {row['rows']} | "
                     f"{row['memory_floor_us']:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sass_trace(shape: str = "down", rows: int = 1, tile: int = 16) -> None:
    """Compile each scheme for sm_90 (Triton's compiler and ptxas, no GPU needed) and print its
    registers and the order of global loads (L), float arithmetic (F) and stores (S) in its SASS,
    runs collapsed: "L9 F56 L9 F56 ..." is a loop whose chunks each wait for their own loads."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    outputs, inputs = SHAPES[shape]
    base = dict(OUTPUTS=outputs, INPUTS=inputs, TILE=tile, ROWS=triton.next_power_of_2(rows), CHUNK=CHUNK)
    extra = {"rolled": {"UNROLL": 1}, "unrolled": {"UNROLL": inputs // CHUNK},
             "whole": {"WIDTH": triton.next_power_of_2(inputs)}, "split": {}}
    for scheme, kernel in (("rolled", _chunked), ("unrolled", _chunked), ("whole", _whole), ("split", _split)):
        constants = {**base, **extra[scheme]}
        signature = {"x": "*fp32", "w": "*bf16", "y": "*fp32", "rows": "i32", **{k: "constexpr" for k in constants}}
        compiled = triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": 4})
        with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as handle:
            handle.write(compiled.asm["cubin"])
        try:
            sass = subprocess.run([str(tool), "-sass", handle.name], capture_output=True, text=True).stdout
            usage = subprocess.run([str(tool), "--dump-resource-usage", handle.name], capture_output=True,
                                   text=True).stdout
        finally:
            os.unlink(handle.name)
        registers = re.search(r"REG:(\d+)", usage)
        trace: list[list] = []
        for op in re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?P\w+\s+)?([A-Z][A-Z0-9._]*)", sass):
            kind = "L" if op.startswith("LDG") else "S" if op.startswith("STG") else \
                "F" if op.startswith(("FFMA", "FADD", "FMUL", "HFMA")) else None
            if kind is None:
                continue
            if trace and trace[-1][0] == kind:
                trace[-1][1] += 1
            else:
                trace.append([kind, 1])
        loads = sum(n for kind, n in trace if kind == "L")
        print(f"{scheme:9s} {shape} {outputs}x{inputs}, {rows} rows, tile {tile}: "
              f"{registers.group(1) if registers else '?'} registers, {loads} loads; "
              + " ".join(f"{kind}{n}" for kind, n in trace[:40]) + (" ..." if len(trace) > 40 else ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--tile", type=int, default=16, help="output rows per program")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--sass", action="store_true", help="no GPU: the schemes' SASS for sm_90, summarized")
    args = parser.parse_args()
    if args.sass:
        for rows in args.rows:
            sass_trace("down", rows, args.tile)
        return
    programs = torch.cuda.get_device_properties(0).multi_processor_count
    results = [row for rows in args.rows for row in products(rows, args.tile, programs)]
    barrier = barriers(programs)
    print(f"{torch.cuda.get_device_name()}, {programs} programs, tile {args.tile}")
    print(table(results))
    print(f"grid barrier: {barrier['atomic_us_per_barrier']:.2f} us polling with atomics, "
          f"{barrier['volatile_us_per_barrier']:.2f} us polling with volatile loads ({programs} programs)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "programs": programs,
                                        "products": results, "barrier": barrier}, indent=1))


if __name__ == "__main__":
    main()
