"""The Triton decode-attention kernel alone: time per call and achieved bandwidth (GPU).

One layer's attention of one new token over a full cache (3 KV heads x 3 query rows, dim 64, bf16),
for several batch sizes, cache sizes and block sizes; the bandwidth counts the keys and values read
once. Times are CUDA-graph replays of the kernel and the combine of its blocks (eager ops; inside
the compiled step the combine fuses with the next kernels). The model step calls it once per layer.

    python bench/bench_decode_kernel.py
"""

from __future__ import annotations

import torch
import triton.testing

from lckv_stream.decode_kernel import block_slots, decode_attention


def main() -> None:
    heads, rows, dim, sink = 3, 3, 64, 4
    print("| batch | cache slots | block | us/call | GB/s (K+V read) | chosen |\n|---|---|---|---|---|---|")
    for batch in (1, 8, 64):
        for capacity in (1024, 4096):
            query = torch.randn(batch, heads, rows, dim, device="cuda", dtype=torch.bfloat16)
            keys, values = (torch.randn(batch, heads, capacity, dim, device="cuda", dtype=torch.bfloat16)
                            for _ in range(2))
            sink_keys = torch.randn(batch, heads, sink, dim, device="cuda", dtype=torch.bfloat16)
            cos, sin = torch.rand(batch, dim, device="cuda", dtype=torch.bfloat16), torch.rand(batch, dim, device="cuda", dtype=torch.bfloat16)
            sink_cos, sink_sin = (torch.rand(batch, sink, dim, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            token_index = torch.arange(capacity, device="cuda").repeat(batch, 1) + 10_000
            token_index[:, :sink] = torch.arange(sink, device="cuda")
            t = torch.full((batch,), 10_000 + capacity, device="cuda")
            chosen = block_slots(batch, heads, capacity)
            for block in (16, 32, 64, 128):
                call = lambda: decode_attention(query, cos, sin, keys, values, sink_keys, sink_cos, sink_sin,  # noqa: E731
                                                token_index, t, sink, capacity - sink, 0, False, block)
                call()  # compile the kernel, then time it with the combine as one graph replay
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    call()
                us = triton.testing.do_bench(graph.replay, warmup=25, rep=200, return_mode="median") * 1e3
                gbs = 2 * keys.numel() * keys.element_size() / us / 1e3
                print(f"| {batch} | {capacity} | {block} | {us:.1f} | {gbs:.0f} | {'*' if block == chosen else ''} |")


if __name__ == "__main__":
    main()
