"""One token's attention over the sink + window cache as a Triton kernel (GPU decode steps).

Split-KV ("flash-decoding"): one program per (sequence, KV head, block of cache slots) rotates the
query rows of that KV head (RoPE) and the sink keys of its block, scores the rows against the block,
masks by stream index, and writes the block's softmax statistics and weighted values; a few tensor
operations combine the blocks (under `torch.compile` they fuse into the next kernels). Reading each
cached key and value once, in the cache's 16-bit type, is what makes the step's cost track the cache
size at memory bandwidth, for one sequence or many.

The kernel is registered as a `torch.library.triton_op`, so a compiled step calls it inside the
CUDA graph. Without Triton (CPU wheels of torch) `AVAILABLE` is False and callers use the
portable path in `attention.py`.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton
except ImportError:  # CPU-only installs
    AVAILABLE = False
else:
    AVAILABLE = True

HALF_TYPES = (torch.bfloat16, torch.float16)  # cache types the kernel reads (matrix units)


def block_slots(batch: int, kv_heads: int, capacity: int) -> int:
    """Cache slots per program: small blocks when few sequences (enough programs to fill the GPU),
    larger ones when many (fewer partial results to combine)."""
    for block in (16, 32, 64):
        if batch * kv_heads * -(-capacity // block) <= 1024:
            return block
    return 128


if AVAILABLE:

    @triton.jit
    def _rotate(x_ptr, offsets, dims, cos, sin, mask, HALF: tl.constexpr):
        """RoPE of rows loaded from x_ptr + offsets: x * cos + rotate_half(x) * sin (float32)."""
        x = tl.load(x_ptr + offsets + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        partner = tl.where(dims < HALF, dims + HALF, dims - HALF)
        sign = tl.where(dims < HALF, -1.0, 1.0)
        swapped = tl.load(x_ptr + offsets + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        return x * cos + swapped * sign[None, :] * sin

    @triton.jit
    def _attend_blocks(
        query, query_cos, query_sin, keys, values, sink_keys, sink_cos, sink_sin, token_index, query_index,
        block_out, block_max, block_sum,
        capacity, sink, window, sliding_window, scale, rows,
        q_batch, q_head, q_row,
        k_batch, k_head, k_slot,
        v_batch, v_head, v_slot,
        s_batch, s_head, s_slot,
        t_batch,
        ROWS: tl.constexpr, DIM: tl.constexpr, BLOCK: tl.constexpr,
        NO_DIAGONAL: tl.constexpr, SLIDING: tl.constexpr,
    ):
        b = tl.program_id(0)
        h = tl.program_id(1)
        block = tl.program_id(2)
        heads = tl.num_programs(1)
        blocks = tl.num_programs(2)
        row = tl.arange(0, ROWS)
        slots = block * BLOCK + tl.arange(0, BLOCK)
        dims = tl.arange(0, DIM)
        in_cache = slots < capacity
        k = tl.load(keys + b * k_batch + h * k_head + slots[:, None] * k_slot + dims[None, :],
                    mask=(in_cache & (slots >= sink))[:, None], other=0.0)
        if block * BLOCK < sink:
            # Sink keys are kept un-rotated: rotate them at s + shift (their place in the cache frame).
            in_sink = (slots < sink)[:, None]
            at = b * sink * DIM + slots[:, None] * DIM + dims[None, :]
            cos = tl.load(sink_cos + at, mask=in_sink, other=0.0)
            sin = tl.load(sink_sin + at, mask=in_sink, other=0.0)
            rotated = _rotate(sink_keys, b * s_batch + h * s_head + slots[:, None] * s_slot, dims, cos, sin,
                              in_sink, DIM // 2)
            k = (k.to(tl.float32) + rotated).to(k.dtype)
        v = tl.load(values + b * v_batch + h * v_head + slots[:, None] * v_slot + dims[None, :],
                    mask=in_cache[:, None], other=0.0)
        # The query rows of this KV head, rotated at the query's stream index (rows padded to 16 for
        # the matrix units).
        q_cos = tl.load(query_cos + b * DIM + dims)[None, :]
        q_sin = tl.load(query_sin + b * DIM + dims)[None, :]
        q = _rotate(query, b * q_batch + h * q_head + row[:, None] * q_row, dims, q_cos, q_sin,
                    (row < rows)[:, None], DIM // 2).to(k.dtype)
        t = tl.load(query_index + b)
        key = tl.load(token_index + b * t_batch + slots, mask=in_cache, other=-1)
        if NO_DIAGONAL:
            visible = (key >= 0) & (key < t)
        else:
            visible = (key >= 0) & (key <= t)
        visible = visible & ((key < sink) | (key > t - window))
        if SLIDING:
            visible = visible & (key > t - sliding_window)
        scores = tl.dot(q, tl.trans(k)) * scale  # [ROWS, BLOCK]
        scores = tl.where(visible[None, :], scores, float("-inf"))
        # A block with no visible slot keeps a finite max, so its weights are exp(-inf) = 0.
        top = tl.maximum(tl.max(scores, axis=1), -1e30)
        weights = tl.exp(scores - top[:, None])
        out = tl.dot(weights.to(v.dtype), v)  # [ROWS, DIM]
        out_row = ((b * heads + h) * blocks + block) * rows + row
        keep = row < rows
        tl.store(block_max + out_row, top, mask=keep)
        tl.store(block_sum + out_row, tl.sum(weights, axis=1), mask=keep)
        tl.store(block_out + out_row[:, None] * DIM + dims[None, :], out, mask=keep[:, None])

    @triton_op("lckv_stream::decode_attention", mutates_args=())
    def decode_attention(
        query: torch.Tensor,
        query_cos: torch.Tensor,
        query_sin: torch.Tensor,
        keys: torch.Tensor,
        values: torch.Tensor,
        sink_keys: torch.Tensor,
        sink_cos: torch.Tensor,
        sink_sin: torch.Tensor,
        token_index: torch.Tensor,
        query_index: torch.Tensor,
        sink: int,
        window: int,
        sliding_window: int,
        no_diagonal: bool,
        block: int = 0,
    ) -> torch.Tensor:
        """Attention of raw (un-rotated) query rows [b, kv_heads, rows, dim] over a layer's cache.

        query_cos/sin: [b, dim] at the query's stream index; keys, values: [b, kv_heads, capacity,
        dim] in bf16 or fp16 (window keys rotated); sink_keys: [b, kv_heads, sink, dim] un-rotated, with sink_cos/sin
        [b, sink, dim] at their positions in the cache frame (any tensors when sink is 0);
        token_index: [b, capacity] stream index per slot (-1 empty); query_index: [b]. Rows that see
        no key get zeros. `block`: slots per program (0: chosen by `block_slots`).
        """
        b, heads, rows, dim = query.shape
        capacity = keys.shape[2]
        block = block or block_slots(b, heads, capacity)
        blocks = triton.cdiv(capacity, block)
        block_max = query.new_empty((b, heads, blocks, rows), dtype=torch.float32)
        block_sum = torch.empty_like(block_max)
        block_out = query.new_empty((b, heads, blocks, rows, dim), dtype=torch.float32)
        wrap_triton(_attend_blocks)[(b, heads, blocks)](
            query, query_cos, query_sin, keys, values, sink_keys, sink_cos, sink_sin, token_index, query_index,
            block_out, block_max, block_sum,
            capacity, sink, window, sliding_window, dim**-0.5, rows,
            query.stride(0), query.stride(1), query.stride(2),
            keys.stride(0), keys.stride(1), keys.stride(2),
            values.stride(0), values.stride(1), values.stride(2),
            sink_keys.stride(0), sink_keys.stride(1), sink_keys.stride(2),
            token_index.stride(0),
            ROWS=max(16, triton.next_power_of_2(rows)), DIM=dim, BLOCK=block,
            NO_DIAGONAL=no_diagonal, SLIDING=sliding_window > 0,
        )
        top = block_max.amax(2, keepdim=True)
        scale = torch.exp(block_max - top)
        total = (block_sum * scale).sum(2)
        out = (block_out * scale.unsqueeze(-1)).sum(2) / total.clamp(min=1e-30).unsqueeze(-1)
        return out.to(query.dtype)
