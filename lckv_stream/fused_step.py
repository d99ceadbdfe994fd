"""The one-token decode step as a few Triton kernels a layer, or as one persistent kernel (GPU).

The compiled step replays about 360 kernels a token for the default model (30 layers), and on an
H100 each costs about a microsecond of launch gap however little it does: the step is bound by the
number of kernels, not by the 269 MB of weights it reads (0.08 ms at the memory's speed). Here a
layer is five phases, each one kernel's worth of work spread over the GPU's programs:

  qkv      RMSNorm, the q/k/v product, RoPE of q and k, the new token's k/v into the cache
  attend   the query rows of each KV head against a block of cache slots (split-KV partials;
           the sink keys rotated to their place in the row's cache frame as they are read); the
           last block of each row and KV head to finish combines them into the attention output
  out      the o product, added to the residual stream
  up       RMSNorm, the gate/up product, SiLU(gate) * up
  down     the down product, added to the residual stream

then the final RMSNorm and the output head. `mode="layers"` launches each phase as its own kernel
(five a layer, 151 a step); `mode="persistent"` runs the whole step as one kernel whose programs
loop over the layers and wait for each other between phases (a grid barrier on a counter), so a
step is one launch. The same phase functions serve both, and Triton's interpreter runs them on a
CPU (a persistent kernel of one program needs no other program to wait for).

What it covers: a `SinkWindowCache` in float16/bfloat16 with no sliding-window ring, a model in
the same dtype with fused q/k/v and gate/up weights (`fusion.fuse_projections`), no biases, up to
`MAX_ROWS` rows, head size a power of two of at least 16, hidden and intermediate sizes multiples of
64. `fits` says whether a model and cache qualify; elsewhere the compiled step serves.
The residual stream is kept in float32 between the phases (the eager step keeps it in the model's
dtype), so the logits agree with the eager step's within that dtype's rounding, not bit for bit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the compiled or eager step serves
    AVAILABLE = False
else:
    AVAILABLE = True

MAX_ROWS = 8  # rows (conversations) a fused step serves; larger batch classes use the compiled step
CHUNK = 64  # inputs per step of a product's inner loop (hidden and intermediate sizes are multiples)
# Output rows per program of each product: qkv (per half of a head: RoPE pairs d, d + dim/2),
# out/up/down, and the head. Measured on an H100 (bench/RESULTS.md): smaller tiles, more programs
# each with fewer rows, were slower (each program's items run one after another);
# LCKV_FUSED_TILES="half,row,head" (powers of two) sets them for measuring.
HALF_TILE, ROW_TILE, HEAD_TILE = 16, 16, 64
if os.environ.get("LCKV_FUSED_TILES"):
    HALF_TILE, ROW_TILE, HEAD_TILE = (int(value) for value in os.environ["LCKV_FUSED_TILES"].split(","))
# How a product reads its inputs: "chunks" (64 at a time, a loop: the measured default) or "whole"
# (each tile's whole width in one load); LCKV_FUSED_PRODUCTS sets it for measuring.
PRODUCTS = os.environ.get("LCKV_FUSED_PRODUCTS", "chunks")
if PRODUCTS not in ("chunks", "whole"):
    raise ValueError(f"LCKV_FUSED_PRODUCTS must be 'chunks' or 'whole', got {PRODUCTS!r}")
SLOTS = 64  # cache slots per attend program (at most 128 blocks of them: larger caches take more)


def fused_step_mode() -> str | None:
    """LCKV_FUSED_STEP: "persistent" or "layers" serves the GPU steps of up to MAX_ROWS rows with
    the fused kernels; unset, "" or "0": the compiled step (the default: on an H100 the fused step
    is slower, bench/RESULTS.md)."""
    value = os.environ.get("LCKV_FUSED_STEP", "").strip().lower()
    if value in ("", "0", "off"):
        return None
    if value not in ("persistent", "layers"):
        raise ValueError(f"LCKV_FUSED_STEP must be 'persistent', 'layers' or '0', got {value!r}")
    return value


def fits(model, cache) -> str | None:
    """Why the fused step cannot serve this model and cache (None when it can)."""
    config = model.config
    dim = config.head_dim
    groups = config.num_attention_heads // config.num_key_value_heads
    checks = [
        (AVAILABLE, "Triton is not installed"),
        (cache.dtype in (torch.float16, torch.bfloat16), f"the cache is {cache.dtype}, not 16-bit"),
        (model.dtype == cache.dtype, "the model's dtype differs from the cache's"),
        (not cache.ring_layers, "sliding-window producers keep a ring of their own"),
        (cache.batch_size <= MAX_ROWS, f"more than {MAX_ROWS} rows"),
        (dim >= 16 and dim & (dim - 1) == 0, f"head size {dim} is not a power of two of at least 16"),
        (groups <= 16, "more than 16 query heads per KV head"),
        (config.hidden_size % CHUNK == 0 and config.intermediate_size % CHUNK == 0,
         f"hidden and intermediate sizes must be multiples of {CHUNK}"),
        (not config.attention_bias and not config.mlp_bias, "biases"),
        (config.hidden_act == "silu", f"activation {config.hidden_act}"),
        (all(layer.mlp.gate_up_weight is not None and (layer.self_attn.qkv_weight is not None
                                                       or not layer.self_attn.computes_kv)
             for layer in model.model.layers), "projections not fused (fusion.fuse_projections)"),
    ]
    return next((why for ok, why in checks if not ok), None)


if AVAILABLE:
    # Sizes the kernels read as compile-time constants (plain numbers in Triton's interpreter, whose
    # Python arithmetic does not take constexpr objects).
    _constant = (lambda value: value) if os.environ.get("TRITON_INTERPRET") == "1" else tl.constexpr
    CHUNK_C = _constant(CHUNK)
    HALF_TILE_C = _constant(HALF_TILE)
    ROW_TILE_C = _constant(ROW_TILE)
    HEAD_TILE_C = _constant(HEAD_TILE)
    WHOLE_C = _constant(PRODUCTS == "whole")

    @triton.jit
    def _pointer(table, index, DTYPE: tl.constexpr):
        """The tensor whose address is table[index] (per-layer weights, per-producer buffers)."""
        return tl.load(table + index).to(tl.pointer_type(DTYPE))

    @triton.jit
    def _next_pow2(n: tl.constexpr):
        """The power of two at least `n`, as a compile-time constant (tl.arange takes powers of two)."""
        w0: tl.constexpr = n - 1
        w1: tl.constexpr = w0 | (w0 >> 1)
        w2: tl.constexpr = w1 | (w1 >> 2)
        w3: tl.constexpr = w2 | (w2 >> 4)
        w4: tl.constexpr = w3 | (w3 >> 8)
        return tl.constexpr((w4 | (w4 >> 16)) + 1)

    @triton.jit
    def _inverse_rms(x_ptr, rows, eps, HIDDEN: tl.constexpr, ROWS: tl.constexpr):
        """1 / RMS of each of the first `rows` rows [ROWS] of a float32 [*, HIDDEN] buffer."""
        batch = tl.arange(0, ROWS)
        if WHOLE_C:  # one load for the whole width: no chain of round trips
            width: tl.constexpr = _next_pow2(HIDDEN)
            inputs = tl.arange(0, width)
            x = tl.load(x_ptr + batch[:, None] * HIDDEN + inputs[None, :],
                        mask=(batch < rows)[:, None] & (inputs < HIDDEN)[None, :], other=0.0, cache_modifier=".cg")
            total = tl.sum(x * x, axis=1)
        else:
            inputs = tl.arange(0, CHUNK_C)
            total = tl.zeros([ROWS], tl.float32)
            for start in range(0, HIDDEN, CHUNK_C):
                x = tl.load(x_ptr + batch[:, None] * HIDDEN + start + inputs[None, :],
                            mask=(batch < rows)[:, None], other=0.0, cache_modifier=".cg")
                total += tl.sum(x * x, axis=1)
        return 1.0 / tl.sqrt(total / HIDDEN + eps)

    @triton.jit
    def _product(x_ptr, scale, norm_ptr, w_ptr, out_rows, rows, NORM: tl.constexpr, INPUTS: tl.constexpr,
                 TILE: tl.constexpr, ROWS: tl.constexpr):
        """x [rows, INPUTS] (float32; with NORM: times `scale` per row and the norm weight) against
        the weight rows `out_rows` [TILE] of w [*, INPUTS]: [ROWS, TILE] float32."""
        batch = tl.arange(0, ROWS)
        acc = tl.zeros([ROWS, TILE], tl.float32)
        if WHOLE_C:
            # The tile's whole width in one load, issued before any arithmetic needs it, then each
            # row against it: one round trip to memory, where the chunk loop below waits for each
            # chunk's loads in turn (bench/fused_products.py --sass).
            width: tl.constexpr = _next_pow2(INPUTS)
            inputs = tl.arange(0, width)
            inside = inputs < INPUTS
            w = tl.load(w_ptr + out_rows[:, None] * INPUTS + inputs[None, :], mask=inside[None, :], other=0.0)
            if NORM:
                weight = tl.load(norm_ptr + inputs, mask=inside, other=0.0).to(tl.float32)
            for r in tl.static_range(ROWS):
                x = tl.load(x_ptr + r * INPUTS + inputs, mask=inside & (inputs * 0 + r < rows), other=0.0,
                            cache_modifier=".cg")
                if NORM:
                    row_scale = tl.sum(tl.where(batch == r, scale, 0.0), axis=0)
                    x = (x * row_scale).to(w_ptr.dtype.element_ty).to(tl.float32) * weight
                    x = x.to(w_ptr.dtype.element_ty).to(tl.float32)
                out = tl.sum(w.to(tl.float32) * x[None, :], axis=1)
                acc = tl.where(batch[:, None] == r, out[None, :], acc)
        else:
            inputs = tl.arange(0, CHUNK_C)
            for start in range(0, INPUTS, CHUNK_C):
                x = tl.load(x_ptr + batch[:, None] * INPUTS + start + inputs[None, :],
                            mask=(batch < rows)[:, None], other=0.0, cache_modifier=".cg")
                if NORM:
                    weight = tl.load(norm_ptr + start + inputs).to(tl.float32)
                    # as the eager RMSNorm: normalized in float32, rounded to the weights' dtype, then scaled
                    x = (x * scale[:, None]).to(w_ptr.dtype.element_ty).to(tl.float32) * weight[None, :]
                    x = x.to(w_ptr.dtype.element_ty).to(tl.float32)
                w = tl.load(w_ptr + out_rows[:, None] * INPUTS + start + inputs[None, :]).to(tl.float32)
                acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
        return acc

    @triton.jit
    def _phase_prologue(pid, programs, rows, tokens, embed, hidden, seen, query_index, cos, sin, sink_cos, sink_sin,
                        slot, active, token_index, token_ids, row_sink, row_window, inv_freq, scaling, sink, capacity,
                        DTYPE: tl.constexpr, HIDDEN: tl.constexpr, DIM: tl.constexpr, SINKS: tl.constexpr):
        """Each program: one row's bookkeeping, as the eager step does it with a dozen small ops: its
        stream index and new slot (sinks first, then a ring of its own window), the slot claimed in
        `token_index`/`token_ids` where the row steps, RoPE tables at its index and at its sinks'
        places in its cache frame (angles in float64, as `attention.Rope`), its token's embedding
        into the float32 stream, and its count of tokens seen moved on."""
        dims = tl.arange(0, DIM)
        inputs = tl.arange(0, CHUNK_C)
        frequency = tl.load(inv_freq + dims % (DIM // 2)).to(tl.float64)
        for b in range(pid, rows, programs):
            t = tl.load(seen + b)
            on = tl.load(active + b) != 0
            row_sinks = tl.load(row_sink + b)
            window = tl.load(row_window + b)
            where = tl.where(t < row_sinks, t, sink + tl.maximum(t - row_sinks, 0) % window)
            shift = tl.maximum(t + 1 - row_sinks - window, 0)
            tl.store(query_index + b, t)
            tl.store(slot + b, where)
            angle = t.to(tl.float64) * frequency
            tl.store(cos + b * DIM + dims, (tl.cos(angle) * scaling).to(DTYPE))
            tl.store(sin + b * DIM + dims, (tl.sin(angle) * scaling).to(DTYPE))
            if sink > 0:
                places = tl.arange(0, SINKS)
                sink_angle = (places + shift).to(tl.float64)[:, None] * frequency[None, :]
                at = b * sink * DIM + places[:, None] * DIM + dims[None, :]
                tl.store(sink_cos + at, (tl.cos(sink_angle) * scaling).to(DTYPE), mask=(places < sink)[:, None])
                tl.store(sink_sin + at, (tl.sin(sink_angle) * scaling).to(DTYPE), mask=(places < sink)[:, None])
            token = tl.load(tokens + b)
            tl.store(token_index + b * capacity + where, t, mask=on)
            tl.store(token_ids + b * capacity + where, token, mask=on)
            tl.store(seen + b, t + on.to(t.dtype))
            for start in range(0, HIDDEN, CHUNK_C):
                vector = tl.load(embed + token * HIDDEN + start + inputs).to(tl.float32)
                tl.store(hidden + b * HIDDEN + start + inputs, vector)

    @triton.jit
    def _phase_qkv(pid, programs, layer, rows, hidden, qbuf, cos, sin, slot, active, info, qkv_table, norm_table,
                   key_table, value_table, sink_table, eps, sink, cache_b, cache_h, cache_s,
                   DTYPE: tl.constexpr, HIDDEN: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                   DIM: tl.constexpr, ROWS: tl.constexpr):
        """Each program: one half-tile pair of a q, k or v head (rows d and d + DIM/2 for RoPE)."""
        produces = tl.load(info + layer * 4)
        producer = tl.load(info + layer * 4 + 1)
        parts = DIM // (2 * HALF_TILE_C)
        heads_out = HEADS + produces * 2 * KV_HEADS
        w_ptr = _pointer(qkv_table, layer, DTYPE)
        norm_ptr = _pointer(norm_table, 2 * layer, DTYPE)
        batch = tl.arange(0, ROWS)
        in_rows = batch < rows
        lanes = tl.arange(0, HALF_TILE_C)
        scale = _inverse_rms(hidden, rows, eps, HIDDEN, ROWS)
        for item in range(pid, heads_out * parts, programs):
            head = item // parts
            low = (item % parts) * HALF_TILE_C + lanes  # dims of the first half; + DIM/2 the partners
            high = low + DIM // 2
            a = _product(hidden, scale, norm_ptr, w_ptr, head * DIM + low, rows, True, HIDDEN, HALF_TILE_C, ROWS)
            b = _product(hidden, scale, norm_ptr, w_ptr, head * DIM + high, rows, True, HIDDEN, HALF_TILE_C, ROWS)
            # as the eager step: the product in the weights' dtype, then RoPE in float32
            a = a.to(DTYPE).to(tl.float32)
            b = b.to(DTYPE).to(tl.float32)
            if head < HEADS + KV_HEADS:  # q and k rotate: x cos + rotate_half(x) sin
                rope_at = batch[:, None] * DIM
                c_low = tl.load(cos + rope_at + low[None, :], mask=in_rows[:, None], other=0.0,
                                cache_modifier=".cg").to(tl.float32)
                s_low = tl.load(sin + rope_at + low[None, :], mask=in_rows[:, None], other=0.0,
                                cache_modifier=".cg").to(tl.float32)
                c_high = tl.load(cos + rope_at + high[None, :], mask=in_rows[:, None], other=0.0,
                                 cache_modifier=".cg").to(tl.float32)
                s_high = tl.load(sin + rope_at + high[None, :], mask=in_rows[:, None], other=0.0,
                                 cache_modifier=".cg").to(tl.float32)
                ra = a * c_low - b * s_low
                rb = b * c_high + a * s_high
            else:
                ra = a
                rb = b
            if head < HEADS:
                q_at = batch[:, None] * (HEADS * DIM) + head * DIM
                tl.store(qbuf + q_at + low[None, :], ra, mask=in_rows[:, None])
                tl.store(qbuf + q_at + high[None, :], rb, mask=in_rows[:, None])
            else:
                # the new token's slot in each row that steps (the others keep their cache as it is)
                where = tl.load(slot + batch, mask=in_rows, other=0, cache_modifier=".cg")
                write = in_rows & (tl.load(active + batch, mask=in_rows, other=0) != 0)
                if head < HEADS + KV_HEADS:
                    kv = head - HEADS
                    key_at = batch[:, None] * cache_b + kv * cache_h + where[:, None] * cache_s
                    keys = _pointer(key_table, producer, DTYPE)
                    tl.store(keys + key_at + low[None, :], ra.to(DTYPE), mask=write[:, None])
                    tl.store(keys + key_at + high[None, :], rb.to(DTYPE), mask=write[:, None])
                    # a sink's raw key, at its slot of the sink buffer [rows, kv_heads, sink, dim]
                    sinks = _pointer(sink_table, producer, DTYPE)
                    sink_at = batch[:, None] * (KV_HEADS * sink * DIM) + kv * (sink * DIM) + where[:, None] * DIM
                    is_sink = write & (where < sink)
                    tl.store(sinks + sink_at + low[None, :], a.to(DTYPE), mask=is_sink[:, None])
                    tl.store(sinks + sink_at + high[None, :], b.to(DTYPE), mask=is_sink[:, None])
                else:
                    value_kv = head - HEADS - KV_HEADS
                    value_at = batch[:, None] * cache_b + value_kv * cache_h + where[:, None] * cache_s
                    values = _pointer(value_table, producer, DTYPE)
                    tl.store(values + value_at + low[None, :], a.to(DTYPE), mask=write[:, None])
                    tl.store(values + value_at + high[None, :], b.to(DTYPE), mask=write[:, None])

    @triton.jit
    def _rotated_sinks(sinks, at, dims, cos, sin, mask, DIM: tl.constexpr):
        """Raw sink keys loaded at `at` + dims, rotated by cos/sin (float32)."""
        x = tl.load(sinks + at + dims[None, :], mask=mask, other=0.0).to(tl.float32)
        partner = tl.where(dims < DIM // 2, dims + DIM // 2, dims - DIM // 2)
        sign = tl.where(dims < DIM // 2, -1.0, 1.0)
        swapped = tl.load(sinks + at + partner[None, :], mask=mask, other=0.0).to(tl.float32)
        return x * cos + swapped * sign[None, :] * sin

    @triton.jit
    def _phase_attend(pid, programs, layer, rows, qbuf, part_out, part_max, part_sum, done, attended, token_index,
                      query_index, sink_cos, sink_sin, info, key_table, value_table, sink_table, capacity, sink,
                      window, sliding_window, scale, cache_b, cache_h, cache_s, blocks,
                      DTYPE: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr,
                      SLOTS: tl.constexpr, GROUP: tl.constexpr, BLOCKS: tl.constexpr):
        """Each program: the query rows of one (row, KV head) against one block of SLOTS slots (padded
        to GROUP rows for the matrix units); the last block of each (row, KV head) combines them all."""
        producer = tl.load(info + layer * 4 + 1)
        no_diagonal = tl.load(info + layer * 4 + 2)
        sliding = tl.load(info + layer * 4 + 3)
        keys_ptr = _pointer(key_table, producer, DTYPE)
        values_ptr = _pointer(value_table, producer, DTYPE)
        sinks_ptr = _pointer(sink_table, producer, DTYPE)
        groups = HEADS // KV_HEADS
        dims = tl.arange(0, DIM)
        lanes = tl.arange(0, GROUP)
        for item in range(pid, rows * KV_HEADS * blocks, programs):
            b = item // (KV_HEADS * blocks)
            kv = (item // blocks) % KV_HEADS
            block = item % blocks
            slots = block * SLOTS + tl.arange(0, SLOTS)
            in_cache = slots < capacity
            at = b * cache_b + kv * cache_h + slots[:, None] * cache_s + dims[None, :]
            k = tl.load(keys_ptr + at, mask=(in_cache & (slots >= sink))[:, None], other=0.0,
                        cache_modifier=".cg").to(tl.float32)
            if block * SLOTS < sink:
                # sinks are kept raw: rotated to s + shift, their place in this row's cache frame
                in_sink = (slots < sink)[:, None]
                frame = b * sink * DIM + slots[:, None] * DIM + dims[None, :]
                c = tl.load(sink_cos + frame, mask=in_sink, other=0.0, cache_modifier=".cg").to(tl.float32)
                s = tl.load(sink_sin + frame, mask=in_sink, other=0.0, cache_modifier=".cg").to(tl.float32)
                raw_at = b * (KV_HEADS * sink * DIM) + kv * (sink * DIM) + slots[:, None] * DIM
                # rounded to the cache's dtype, as the eager step stores rotated sink keys
                k += _rotated_sinks(sinks_ptr, raw_at, dims, c, s, in_sink, DIM).to(DTYPE).to(tl.float32)
            v = tl.load(values_ptr + at, mask=in_cache[:, None], other=0.0, cache_modifier=".cg")
            q = tl.load(qbuf + b * (HEADS * DIM) + (kv * groups + lanes)[:, None] * DIM + dims[None, :],
                        mask=(lanes < groups)[:, None], other=0.0, cache_modifier=".cg")
            t = tl.load(query_index + b, cache_modifier=".cg")
            key = tl.load(token_index + b * capacity + slots, mask=in_cache, other=-1, cache_modifier=".cg")
            visible = (key >= 0) & ((key < t) | ((key == t) & (no_diagonal == 0)))
            visible = visible & ((key < sink) | (key > t - window))
            visible = visible & ((sliding == 0) | (key > t - sliding_window))
            scores = tl.dot(q.to(DTYPE), tl.trans(k.to(DTYPE))).to(tl.float32) * scale  # [GROUP, SLOTS]
            scores = tl.where(visible[None, :], scores, float("-inf"))
            top = tl.maximum(tl.max(scores, axis=1), -1e30)  # a block with nothing visible: weights 0
            weights = tl.exp(scores - top[:, None])
            out = tl.dot(weights.to(DTYPE), v)  # [GROUP, DIM] float32
            head = kv * groups + lanes
            keep = lanes < groups
            index = (b * HEADS + head) * blocks + block
            tl.store(part_max + index, top, mask=keep)
            tl.store(part_sum + index, tl.sum(weights, axis=1), mask=keep)
            tl.store(part_out + index[:, None] * DIM + dims[None, :], out, mask=keep[:, None])
            # The last block of this (row, KV head) to finish combines its query heads' partials:
            # no pass over the whole grid for it. The count goes back to 0 for the next layer.
            tl.debug_barrier()  # this program's partials are all stored
            finished = tl.atomic_add(done + b * KV_HEADS + kv, 1, sem="acq_rel", scope="gpu")
            if finished == blocks - 1:
                for query_head in range(kv * groups, kv * groups + groups):
                    _combine_head(b * HEADS + query_head, part_out, part_max, part_sum, attended, blocks, DIM, BLOCKS)
                tl.atomic_xchg(done + b * KV_HEADS + kv, 0, sem="acq_rel", scope="gpu")

    @triton.jit
    def _combine_head(item, part_out, part_max, part_sum, attended, blocks, DIM: tl.constexpr,
                      BLOCKS: tl.constexpr):
        """The blocks' partials of one (row, query head) `item` into its attention output."""
        dims = tl.arange(0, DIM)
        lanes = tl.arange(0, BLOCKS)
        used = lanes < blocks
        index = item * blocks + lanes
        top_each = tl.load(part_max + index, mask=used, other=-1e30, cache_modifier=".cg")
        total_each = tl.load(part_sum + index, mask=used, other=0.0, cache_modifier=".cg")
        top = tl.max(top_each, axis=0)
        weight = tl.exp(top_each - top)
        total = tl.sum(total_each * weight, axis=0)
        out = tl.load(part_out + index[:, None] * DIM + dims[None, :], mask=used[:, None], other=0.0,
                      cache_modifier=".cg")
        # a query row that saw no key gets zeros (every block's sum is 0)
        out = tl.sum(out * weight[:, None], axis=0) / tl.maximum(total, 1e-30)
        tl.store(attended + item * DIM + dims, out)

    @triton.jit
    def _phase_residual(pid, programs, layer, rows, hidden, inputs_ptr, table, slot_in_table,
                        DTYPE: tl.constexpr, HIDDEN: tl.constexpr, INPUTS: tl.constexpr, ROWS: tl.constexpr):
        """Each program: ROW_TILE rows of hidden += x @ W^T (the out product, or the down product)."""
        w_ptr = _pointer(table, layer * 2 + slot_in_table, DTYPE)
        batch = tl.arange(0, ROWS)
        lanes = tl.arange(0, ROW_TILE_C)
        for item in range(pid, HIDDEN // ROW_TILE_C, programs):
            out_rows = item * ROW_TILE_C + lanes
            y = _product(inputs_ptr, 1.0, w_ptr, w_ptr, out_rows, rows, False, INPUTS, ROW_TILE_C, ROWS)
            # as the eager step: the product in the weights' dtype, added to the stream
            y = y.to(DTYPE).to(tl.float32)
            at = hidden + batch[:, None] * HIDDEN + out_rows[None, :]
            mask = (batch < rows)[:, None]
            tl.store(at, tl.load(at, mask=mask, other=0.0, cache_modifier=".cg") + y, mask=mask)

    @triton.jit
    def _phase_up(pid, programs, layer, rows, hidden, act, gate_up_table, norm_table, eps,
                  DTYPE: tl.constexpr, HIDDEN: tl.constexpr, INNER: tl.constexpr, ROWS: tl.constexpr):
        """Each program: ROW_TILE rows of SiLU(gate) * up, from the RMSNorm of the stream."""
        w_ptr = _pointer(gate_up_table, layer, DTYPE)
        norm_ptr = _pointer(norm_table, 2 * layer + 1, DTYPE)
        batch = tl.arange(0, ROWS)
        lanes = tl.arange(0, ROW_TILE_C)
        scale = _inverse_rms(hidden, rows, eps, HIDDEN, ROWS)
        for item in range(pid, INNER // ROW_TILE_C, programs):
            out_rows = item * ROW_TILE_C + lanes
            gate = _product(hidden, scale, norm_ptr, w_ptr, out_rows, rows, True, HIDDEN, ROW_TILE_C, ROWS)
            up = _product(hidden, scale, norm_ptr, w_ptr, INNER + out_rows, rows, True, HIDDEN, ROW_TILE_C, ROWS)
            gate = gate.to(DTYPE).to(tl.float32)
            up = up.to(DTYPE).to(tl.float32)
            # as the eager step: each op's result in the weights' dtype
            y = (gate / (1.0 + tl.exp(-gate))).to(DTYPE).to(tl.float32) * up
            tl.store(act + batch[:, None] * INNER + out_rows[None, :], y.to(DTYPE).to(tl.float32),
                     mask=(batch < rows)[:, None])

    @triton.jit
    def _phase_head(pid, programs, rows, hidden, logits, embed, norm_ptr, eps, vocab,
                    HIDDEN: tl.constexpr, ROWS: tl.constexpr):
        """Each program: HEAD_TILE vocabulary rows of the logits, from the final RMSNorm."""
        batch = tl.arange(0, ROWS)
        lanes = tl.arange(0, HEAD_TILE_C)
        scale = _inverse_rms(hidden, rows, eps, HIDDEN, ROWS)
        for item in range(pid, tl.cdiv(vocab, HEAD_TILE_C), programs):
            out_rows = item * HEAD_TILE_C + lanes
            inside = out_rows < vocab
            y = _product(hidden, scale, norm_ptr, embed, tl.where(inside, out_rows, 0), rows, True, HIDDEN,
                         HEAD_TILE_C, ROWS)
            tl.store(logits + batch[:, None] * vocab + out_rows[None, :], y.to(logits.dtype.element_ty),
                     mask=(batch < rows)[:, None] & inside[None, :])

    @triton.jit
    def _barrier(counter, ordinal, programs):
        """Every program waits here until all `programs` have arrived (the `ordinal`-th barrier of
        the step; the counter starts the step at 0). Writes before it are seen after it."""
        tl.debug_barrier()  # this program's threads are all done with the phase
        tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
        target = ordinal * programs
        seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        while seen < target:
            seen = tl.atomic_add(counter, 0, sem="acquire", scope="gpu")
        tl.debug_barrier()

    @triton.jit
    def _persistent_step(counter, done, layers, rows, tokens, embed, seen, row_sink, row_window, token_ids,
                         inv_freq, rope_scaling, hidden, qbuf, part_out, part_max, part_sum, attended, act, logits,
                         cos, sin, sink_cos, sink_sin, slot, active, token_index, query_index, info, qkv_table,
                         norm_table, out_down_table, gate_up_table, key_table, value_table, sink_table, head,
                         final_norm, eps, capacity, sink, window, sliding_window, scale, cache_b, cache_h, cache_s,
                         blocks, vocab,
                         DTYPE: tl.constexpr, HIDDEN: tl.constexpr, INNER: tl.constexpr, HEADS: tl.constexpr,
                         KV_HEADS: tl.constexpr, DIM: tl.constexpr, ROWS: tl.constexpr, SLOTS: tl.constexpr,
                         GROUP: tl.constexpr, BLOCKS: tl.constexpr, SINKS: tl.constexpr):
        """The whole step in one launch: every program takes its share of the rows' bookkeeping, then
        of each phase of each layer, and all wait for each other between phases. Needs every program
        resident at once (a grid no larger than the GPU's multiprocessors)."""
        pid = tl.program_id(0)
        programs = tl.num_programs(0)
        _phase_prologue(pid, programs, rows, tokens, embed, hidden, seen, query_index, cos, sin, sink_cos, sink_sin,
                        slot, active, token_index, token_ids, row_sink, row_window, inv_freq, rope_scaling, sink,
                        capacity, DTYPE, HIDDEN, DIM, SINKS)
        ordinal = 1
        _barrier(counter, ordinal, programs)
        for layer in range(layers):
            _phase_qkv(pid, programs, layer, rows, hidden, qbuf, cos, sin, slot, active, info, qkv_table,
                       norm_table, key_table, value_table, sink_table, eps, sink, cache_b, cache_h, cache_s,
                       DTYPE, HIDDEN, HEADS, KV_HEADS, DIM, ROWS)
            ordinal += 1
            _barrier(counter, ordinal, programs)
            _phase_attend(pid, programs, layer, rows, qbuf, part_out, part_max, part_sum, done, attended,
                          token_index, query_index, sink_cos, sink_sin, info, key_table, value_table, sink_table,
                          capacity, sink, window, sliding_window, scale, cache_b, cache_h, cache_s, blocks,
                          DTYPE, HEADS, KV_HEADS, DIM, SLOTS, GROUP, BLOCKS)
            ordinal += 1
            _barrier(counter, ordinal, programs)
            _phase_residual(pid, programs, layer, rows, hidden, attended, out_down_table, 0,
                            DTYPE, HIDDEN, HEADS * DIM, ROWS)
            ordinal += 1
            _barrier(counter, ordinal, programs)
            _phase_up(pid, programs, layer, rows, hidden, act, gate_up_table, norm_table, eps,
                      DTYPE, HIDDEN, INNER, ROWS)
            ordinal += 1
            _barrier(counter, ordinal, programs)
            _phase_residual(pid, programs, layer, rows, hidden, act, out_down_table, 1, DTYPE, HIDDEN, INNER, ROWS)
            ordinal += 1
            _barrier(counter, ordinal, programs)
        _phase_head(pid, programs, rows, hidden, logits, head, final_norm, eps, vocab, HIDDEN, ROWS)

    # The same phases as kernels of their own (mode "layers"): a grid of as many programs as items.

    @triton.jit
    def _prologue_kernel(rows, tokens, embed, hidden, seen, query_index, cos, sin, sink_cos, sink_sin, slot, active,
                         token_index, token_ids, row_sink, row_window, inv_freq, rope_scaling, sink, capacity,
                         DTYPE: tl.constexpr, HIDDEN: tl.constexpr, DIM: tl.constexpr, SINKS: tl.constexpr):
        _phase_prologue(tl.program_id(0), tl.num_programs(0), rows, tokens, embed, hidden, seen, query_index, cos, sin,
                        sink_cos, sink_sin, slot, active, token_index, token_ids, row_sink, row_window, inv_freq,
                        rope_scaling, sink, capacity, DTYPE, HIDDEN, DIM, SINKS)

    @triton.jit
    def _qkv_kernel(layer, rows, hidden, qbuf, cos, sin, slot, active, info, qkv_table, norm_table, key_table,
                    value_table, sink_table, eps, sink, cache_b, cache_h, cache_s,
                    DTYPE: tl.constexpr, HIDDEN: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                    DIM: tl.constexpr, ROWS: tl.constexpr):
        _phase_qkv(tl.program_id(0), tl.num_programs(0), layer, rows, hidden, qbuf, cos, sin, slot, active, info,
                   qkv_table, norm_table, key_table, value_table, sink_table, eps, sink, cache_b, cache_h, cache_s,
                   DTYPE, HIDDEN, HEADS, KV_HEADS, DIM, ROWS)

    @triton.jit
    def _attend_kernel(layer, rows, qbuf, part_out, part_max, part_sum, done, attended, token_index, query_index,
                       sink_cos, sink_sin, info, key_table, value_table, sink_table, capacity, sink, window,
                       sliding_window, scale, cache_b, cache_h, cache_s, blocks,
                       DTYPE: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, DIM: tl.constexpr,
                       SLOTS: tl.constexpr, GROUP: tl.constexpr, BLOCKS: tl.constexpr):
        _phase_attend(tl.program_id(0), tl.num_programs(0), layer, rows, qbuf, part_out, part_max, part_sum, done,
                      attended, token_index, query_index, sink_cos, sink_sin, info, key_table, value_table,
                      sink_table, capacity, sink, window, sliding_window, scale, cache_b, cache_h, cache_s, blocks,
                      DTYPE, HEADS, KV_HEADS, DIM, SLOTS, GROUP, BLOCKS)

    @triton.jit
    def _residual_kernel(layer, rows, hidden, inputs_ptr, table, slot_in_table,
                         DTYPE: tl.constexpr, HIDDEN: tl.constexpr, INPUTS: tl.constexpr, ROWS: tl.constexpr):
        _phase_residual(tl.program_id(0), tl.num_programs(0), layer, rows, hidden, inputs_ptr, table, slot_in_table,
                        DTYPE, HIDDEN, INPUTS, ROWS)

    @triton.jit
    def _up_kernel(layer, rows, hidden, act, gate_up_table, norm_table, eps,
                   DTYPE: tl.constexpr, HIDDEN: tl.constexpr, INNER: tl.constexpr, ROWS: tl.constexpr):
        _phase_up(tl.program_id(0), tl.num_programs(0), layer, rows, hidden, act, gate_up_table, norm_table, eps,
                  DTYPE, HIDDEN, INNER, ROWS)

    @triton.jit
    def _head_kernel(rows, hidden, logits, embed, norm_ptr, eps, vocab, HIDDEN: tl.constexpr, ROWS: tl.constexpr):
        _phase_head(tl.program_id(0), tl.num_programs(0), rows, hidden, logits, embed, norm_ptr, eps, vocab,
                    HIDDEN, ROWS)


def _triton_dtype(dtype: torch.dtype):
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def _addresses(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """An int64 table of the tensors' addresses (the kernels load a layer's tensors through it)."""
    return torch.tensor([tensor.data_ptr() for tensor in tensors], dtype=torch.int64, device=device)


@dataclass
class _Tables:
    """What a fused step of one model over one cache reads: per-layer weight and per-producer buffer
    addresses, the layer map, and scratch space. The addresses are fixed: the step is bound to this
    cache (a view over rows of a larger one included) and to the model's weights as they are."""

    info: torch.Tensor  # [layers, 4] int32: computes KV, producer index read, no diagonal, sliding
    qkv: torch.Tensor
    norms: torch.Tensor  # input and post-attention norm of each layer, in turn
    out_down: torch.Tensor  # o and down weights of each layer, in turn
    gate_up: torch.Tensor
    keys: torch.Tensor
    values: torch.Tensor
    sinks: torch.Tensor
    hidden: torch.Tensor  # [rows, hidden] float32: the residual stream
    qbuf: torch.Tensor
    part_out: torch.Tensor
    part_max: torch.Tensor
    part_sum: torch.Tensor
    attended: torch.Tensor
    act: torch.Tensor
    query_index: torch.Tensor  # [rows] the new token's stream index (the prologue's)
    slot: torch.Tensor  # [rows] its slot
    cos: torch.Tensor  # [rows, dim] RoPE at its index, in the model's dtype
    sin: torch.Tensor
    sink_cos: torch.Tensor  # [rows, sink, dim] RoPE of the sinks' places in each row's cache frame
    sink_sin: torch.Tensor
    counter: torch.Tensor  # the persistent kernel's barrier
    done: torch.Tensor  # [rows * kv_heads] int32: attend blocks finished (0 between layers)
    blocks: int
    slots: int
    keep: list  # the tensors whose addresses are in the tables, kept alive


class FusedStep:
    """`decode_step` for one model and one cache as fused kernels: call it as
    `step(model, token_ids [rows, 1], cache) -> logits [rows, vocab]` (what `GraphDecoder` captures).

    mode "persistent": one launch a step (`programs` programs, default the GPU's multiprocessors);
    "layers": five launches a layer. The model's weights must not be replaced afterwards (their
    addresses are read once); a new cache needs a new FusedStep."""

    def __init__(self, model, cache, mode: str = "persistent", programs: int | None = None) -> None:
        why = fits(model, cache)
        if why is not None:
            raise ValueError(f"the fused step does not serve this model and cache: {why}")
        if mode not in ("persistent", "layers"):
            raise ValueError(f"mode must be 'persistent' or 'layers', got {mode!r}")
        self.mode, self.model, self.cache = mode, model, cache
        if programs is None:
            programs = (torch.cuda.get_device_properties(cache.device).multi_processor_count
                        if cache.device.type == "cuda" else 1)
        self.programs = programs
        self._tables = self._build(model, cache)
        self.name = f"fused ({mode})"

    @staticmethod
    def _build(model, cache) -> _Tables:
        config, device = model.config, cache.device
        layers = model.model.layers
        info, qkv, norms, out_down, gate_up = [], [], [], [], []
        for index, layer in enumerate(layers):
            attention, mlp = layer.self_attn, layer.mlp
            info.append([int(attention.computes_kv), cache.row(attention.source), int(attention.no_diagonal),
                         int(attention.sliding)])
            qkv.append(attention.qkv_weight if attention.computes_kv else attention.q_proj.weight)
            norms += [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
            out_down += [attention.o_proj.weight, mlp.down_proj.weight]
            gate_up.append(mlp.gate_up_weight)
        weights = qkv + norms + out_down + gate_up
        if any(not weight.is_contiguous() for weight in weights):
            raise ValueError("the fused step reads contiguous weights")
        rows, heads, dim = cache.batch_size, config.num_attention_heads, config.head_dim
        slots = SLOTS
        while -(-cache.capacity // slots) > 128:
            slots *= 2
        blocks = -(-cache.capacity // slots)
        scratch = dict(device=device, dtype=torch.float32)
        return _Tables(
            info=torch.tensor(info, dtype=torch.int32, device=device),
            qkv=_addresses(qkv, device), norms=_addresses(norms, device), out_down=_addresses(out_down, device),
            gate_up=_addresses(gate_up, device), keys=_addresses(cache.keys, device),
            values=_addresses(cache.values, device), sinks=_addresses(cache.sink_keys, device),
            hidden=torch.zeros(rows, config.hidden_size, **scratch),
            qbuf=torch.zeros(rows, heads * dim, **scratch),
            part_out=torch.zeros(rows * heads * blocks, dim, **scratch),
            part_max=torch.zeros(rows * heads * blocks, **scratch),
            part_sum=torch.zeros(rows * heads * blocks, **scratch),
            attended=torch.zeros(rows, heads * dim, **scratch),
            act=torch.zeros(rows, config.intermediate_size, **scratch),
            query_index=torch.zeros(rows, dtype=torch.long, device=device),
            slot=torch.zeros(rows, dtype=torch.long, device=device),
            cos=torch.zeros(rows, dim, dtype=cache.dtype, device=device),
            sin=torch.zeros(rows, dim, dtype=cache.dtype, device=device),
            sink_cos=torch.zeros(rows, max(cache.sink, 1), dim, dtype=cache.dtype, device=device),
            sink_sin=torch.zeros(rows, max(cache.sink, 1), dim, dtype=cache.dtype, device=device),
            counter=torch.zeros(1, dtype=torch.int32, device=device),
            done=torch.zeros(rows * config.num_key_value_heads, dtype=torch.int32, device=device),
            blocks=blocks, slots=slots, keep=weights + list(cache.keys) + list(cache.values) + list(cache.sink_keys),
        )

    def __call__(self, model, token_ids: torch.Tensor, cache) -> torch.Tensor:
        if model is not self.model or cache is not self.cache:
            raise ValueError("a FusedStep serves the model and cache it was built for")
        tables, config = self._tables, model.config
        inner = model.model
        rows = cache.batch_size
        dtype = cache.dtype
        logits = torch.empty(rows, config.vocab_size, dtype=dtype, device=cache.device)
        bookkeeping = (token_ids.view(-1), inner.embed_tokens.weight, cache.seen, cache.row_sink, cache.row_window,
                       cache.token_ids, inner.rotary_emb.inv_freq, float(inner.rotary_emb.attention_scaling))
        cos, sin, sink_cos, sink_sin = tables.cos, tables.sin, tables.sink_cos, tables.sink_sin
        slot, query_index = tables.slot, tables.query_index
        sinks_pow2 = triton.next_power_of_2(max(cache.sink, 1))
        keys = cache.keys[0]
        common = dict(DTYPE=_triton_dtype(dtype), HIDDEN=config.hidden_size)
        strides = (keys.stride(0), keys.stride(1), keys.stride(2))
        heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        eps = float(config.rms_norm_eps)
        rows_pow2 = triton.next_power_of_2(rows)
        group = max(16, triton.next_power_of_2(heads // kv_heads))
        window_args = (cache.capacity, cache.sink, cache.window, int(config.sliding_window or 0), dim ** -0.5)
        if self.mode == "persistent":
            tables.counter.zero_()
            _persistent_step[(self.programs,)](
                tables.counter, tables.done, len(inner.layers), rows, *bookkeeping, tables.hidden, tables.qbuf,
                tables.part_out,
                tables.part_max, tables.part_sum, tables.attended, tables.act, logits, cos, sin, sink_cos, sink_sin,
                slot, cache.active, cache.token_index, query_index, tables.info, tables.qkv, tables.norms,
                tables.out_down, tables.gate_up, tables.keys, tables.values, tables.sinks, model.lm_head.weight,
                inner.norm.weight, eps, *window_args, *strides, tables.blocks, config.vocab_size,
                INNER=config.intermediate_size, HEADS=heads, KV_HEADS=kv_heads, DIM=dim, ROWS=rows_pow2,
                SLOTS=tables.slots, GROUP=group, BLOCKS=triton.next_power_of_2(tables.blocks), SINKS=sinks_pow2,
                **common,
            )
        else:
            tokens, embed, seen, row_sink, row_window, ids, inv_freq, rope_scaling = bookkeeping
            _prologue_kernel[(rows,)](
                rows, tokens, embed, tables.hidden, seen, query_index, cos, sin, sink_cos, sink_sin, slot, cache.active,
                cache.token_index, ids, row_sink, row_window, inv_freq, rope_scaling, cache.sink, cache.capacity,
                DIM=dim, SINKS=sinks_pow2, **common)
            for layer in range(len(inner.layers)):
                outputs = (heads + 2 * kv_heads) * (dim // (2 * HALF_TILE))
                _qkv_kernel[(outputs,)](
                    layer, rows, tables.hidden, tables.qbuf, cos, sin, slot, cache.active, tables.info, tables.qkv,
                    tables.norms, tables.keys, tables.values, tables.sinks, eps, cache.sink, *strides,
                    HEADS=heads, KV_HEADS=kv_heads, DIM=dim, ROWS=rows_pow2, **common)
                _attend_kernel[(rows * kv_heads * tables.blocks,)](
                    layer, rows, tables.qbuf, tables.part_out, tables.part_max, tables.part_sum, tables.done,
                    tables.attended, cache.token_index, query_index, sink_cos, sink_sin, tables.info, tables.keys,
                    tables.values, tables.sinks, *window_args, *strides, tables.blocks, DTYPE=common["DTYPE"],
                    HEADS=heads, KV_HEADS=kv_heads, DIM=dim, SLOTS=tables.slots, GROUP=group,
                    BLOCKS=triton.next_power_of_2(tables.blocks))
                _residual_kernel[(config.hidden_size // ROW_TILE,)](
                    layer, rows, tables.hidden, tables.attended, tables.out_down, 0, INPUTS=heads * dim,
                    ROWS=rows_pow2, **common)
                _up_kernel[(config.intermediate_size // ROW_TILE,)](
                    layer, rows, tables.hidden, tables.act, tables.gate_up, tables.norms, eps,
                    INNER=config.intermediate_size, ROWS=rows_pow2, **common)
                _residual_kernel[(config.hidden_size // ROW_TILE,)](
                    layer, rows, tables.hidden, tables.act, tables.out_down, 1, INPUTS=config.intermediate_size,
                    ROWS=rows_pow2, **common)
            _head_kernel[(triton.cdiv(config.vocab_size, HEAD_TILE),)](
                rows, tables.hidden, logits, model.lm_head.weight, inner.norm.weight, eps, config.vocab_size,
                HIDDEN=config.hidden_size, ROWS=rows_pow2)
        return logits
