"""Positions, masks and the attention kernel for one forward call.

A forward call encodes T new tokens per row, optionally on top of a `SinkWindowCache`. Which keys a
query may see follows from stream indices alone:

    visible(t, s) = s held  and  s <= t (s < t without diagonal)  and  (s < sink or s > t - window)

Positions follow StreamingLLM: a token's place in the cache, not in the text. For query t the cache
has shifted by shift(t) = max(0, t + 1 - capacity): the query sits at t - shift(t), a window key s at
s - shift(t), a sink key at s. Window keys therefore keep their true distance t - s: queries and
window keys are rotated at their absolute stream index (angles in float64, exact at any length).
A sink key is rotated at s + shift(t) for the call's last query, which is exact for one-token calls
and for calls that do not overflow the cache; otherwise the sink columns are re-scored per query.

One new token (decode) is written into its ring slot before attention, so attention reads the cache
buffers in place: its slot's previous holder is out of the window anyway. Several new tokens attend
to [cache | new] and are written afterwards.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from . import decode_kernel, int8_kernel
from .cache import EMPTY, SinkWindowCache


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [batch, heads, n, dim] by cos/sin [batch, n, dim] (the Llama convention)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class Rope:
    """cos/sin for integer positions; angles in float64 so that a position of 10^7 stays exact."""

    def __init__(self, inv_freq: torch.Tensor, scaling: float) -> None:
        self.inv_freq = inv_freq.double()
        self.scaling = scaling

    def __call__(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        angles = positions.unsqueeze(-1).double() * self.inv_freq.to(positions.device)
        angles = torch.cat((angles, angles), dim=-1)
        return (angles.cos() * self.scaling).to(dtype), (angles.sin() * self.scaling).to(dtype)


@dataclass
class ProducedKV:
    """A producer layer's KV as attention reads it, plus its new tokens' share (for the cache)."""

    keys: torch.Tensor  # [batch, kv_heads, keys, dim], rotated
    values: torch.Tensor
    new_keys: torch.Tensor | None = None  # [batch, kv_heads, T, dim], rotated (T > 1 only)
    new_raw_keys: torch.Tensor | None = None
    new_values: torch.Tensor | None = None


@dataclass
class ForwardContext:
    """Everything the layers of one forward call share: positions, masks, and the producers' KV."""

    rope: Rope
    cache: SinkWindowCache | None
    steps: int
    groups: int  # query heads per KV head
    dtype: torch.dtype
    query_index: torch.Tensor  # [batch or 1, T] absolute stream index of each new token
    query_cos: torch.Tensor
    query_sin: torch.Tensor
    sliding_window: int = 0
    slot: torch.Tensor | None = None  # decode: the slot of the new token
    ring_slot: torch.Tensor | None = None  # decode: its slot in the sliding-window producers' buffers
    sink_query_cos: torch.Tensor | None = None  # set when sink columns need re-scoring per query
    sink_query_sin: torch.Tensor | None = None
    shift: torch.Tensor | None = None
    decode_kernel: bool = False  # one-token call through the Triton kernel
    cpu_kernel: bool = False  # one-token call through the CPU kernel (`torch.ops.lckv.decode_attention`)
    sink_cos: torch.Tensor | None = None  # either kernel: RoPE of the sink keys' places [batch, sink, dim]
    sink_sin: torch.Tensor | None = None
    # A chunk's cached key columns (full buffers, ring buffers): every slot, or (eager calls) only the
    # leading ones any row holds, so early in a conversation a chunk does not score empty slots.
    columns: tuple[int, int] = (0, 0)
    padded: bool = False  # some rows start with padding: masks instead of the fused causal kernel
    most_padding: int = 0  # the largest row padding (host), for the sink columns to re-score
    produced: dict[int, ProducedKV] = field(default_factory=dict)
    _masks: dict[tuple[bool, bool, bool], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _sink_plans: dict[bool, tuple[torch.Tensor, ...]] = field(default_factory=dict)
    _sink_copy_plans: dict[tuple[bool, bool, bool], tuple | None] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        rope: Rope,
        cache: SinkWindowCache | None,
        input_ids: torch.Tensor,
        groups: int,
        sliding_window: int,
        dtype: torch.dtype,
        padding: list[int] | None = None,
    ) -> "ForwardContext":
        """`padding`: per row, how many of the T new tokens are left padding (None: none). Padding
        gets stream index EMPTY: no query sees it, it sees nothing, and it is not cached."""
        batch, steps = input_ids.shape
        offsets = torch.arange(steps, device=input_ids.device).unsqueeze(0)
        start = cache.seen.unsqueeze(1) if cache is not None else 0
        if padding is None:
            query_index = start + offsets  # [batch or 1, T]
        else:
            pad = torch.tensor(padding, device=input_ids.device).view(-1, 1)
            query_index = torch.where(offsets >= pad, start + offsets - pad, EMPTY)
        cos, sin = rope(query_index, dtype)
        context = cls(rope, cache, steps, groups, dtype, query_index, cos, sin, sliding_window)
        if padding is not None:
            context.padded, context.most_padding = True, max(padding)
        if cache is None:
            return context
        context.shift = cache.shift(query_index)
        context.decode_kernel = steps == 1 and cache.attention_backend == "triton"
        context.cpu_kernel = (steps == 1 and cache.attention_backend == "cpu"
                              and int8_kernel.decode_attention_fits(groups, cache.keys[0].shape[-1]))
        if context.decode_kernel or context.cpu_kernel:
            # The kernels rotate the sink keys themselves: the cache buffers are not rewritten every step.
            context.sink_cos, context.sink_sin = context._sink_rope(context.shift[:, -1])
        else:
            context._refresh_sink_keys(context.shift[:, -1])
        if steps == 1:
            context.slot, context.ring_slot = cache.claim_next_slot(input_ids)
            return context
        fixed = torch.compiler.is_compiling() or _capturing(input_ids)  # no host reads: every slot
        if fixed:
            context.columns = (cache.capacity, cache.ring_capacity)
        else:
            context.columns = (cache.held_columns(), cache.held_columns(ring=True) if cache.ring_layers else 0)
        if cache.sink > 0 and (fixed or bool((context.shift[:, 0] != context.shift[:, -1]).any())):
            # Re-score sink columns per query when the call overflows the cache; a captured or
            # compiled call always does (it is exact either way, and the check would need the host).
            context.sink_query_cos, context.sink_query_sin = rope(query_index - context.shift, dtype)
        return context

    def _refresh_sink_keys(self, shift: torch.Tensor) -> None:
        """Rotate the sink keys to s + shift: their distance to the newest query in the cache frame."""
        cache = self.cache
        if cache.sink == 0:
            return
        cos, sin = self._sink_rope(shift)
        stacked = torch.stack(cache.sink_keys)  # [producers, batch, kv_heads, sink, dim]
        p, b, h, s, d = stacked.shape
        raw = stacked.transpose(0, 1).reshape(b, p * h, s, d)
        rotated = apply_rope(raw, cos, sin).reshape(b, p, h, s, d).transpose(0, 1)
        cache.write_rotated_sinks(rotated)

    def _sink_rope(self, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin [batch, sink, dim] at s + shift: the sinks' places in the newest query's cache frame."""
        positions = torch.arange(self.cache.sink, device=shift.device) + shift.unsqueeze(1)
        return self.rope(positions, self.dtype)

    # ---- producers' KV ------------------------------------------------------------------------
    def produce(self, layer: int, raw_keys: torch.Tensor, values: torch.Tensor) -> None:
        """Record a producer layer's new KV (keys before RoPE) for its readers and for the cache."""
        keys = apply_rope(raw_keys, self.query_cos, self.query_sin)
        cache = self.cache
        if cache is None:
            self.produced[layer] = ProducedKV(keys, values)
        elif self.slot is not None:
            cache.write_token(layer, self.ring_slot if cache.on_ring(layer) else self.slot, keys, raw_keys, values)
            self.produced[layer] = ProducedKV(cache.layer_keys(layer), cache.layer_values(layer))
        else:
            columns = self.cached_columns(cache.on_ring(layer))
            # In the cache's dtype: a cache more compact than the activations (the CPU fast path) is
            # attended in its own dtype, not widened slot by slot for every chunk.
            self.produced[layer] = ProducedKV(
                torch.cat((cache.layer_keys(layer)[:, :, :columns], keys.to(cache.dtype)), dim=2),
                torch.cat((cache.layer_values(layer)[:, :, :columns], values.to(cache.dtype)), dim=2),
                keys, raw_keys, values,
            )

    def read(self, layer: int, like: torch.Tensor) -> ProducedKV:
        """The KV a reader of `layer` sees. A layer reading from above runs before its source: its
        new tokens' KV does not exist yet (zeros; masked for the current token in any case)."""
        if layer not in self.produced:
            if self.slot is not None:
                return ProducedKV(self.cache.layer_keys(layer), self.cache.layer_values(layer))
            batch, heads, _, dim = like.shape
            zeros = like.new_zeros(batch, heads // self.groups, self.steps, dim)
            self.produce(layer, zeros, zeros)
        return self.produced[layer]

    def finish(self, token_ids: torch.Tensor, padding: list[int] | None = None) -> None:
        """Commit the call's new tokens to the cache (not the rows' left padding)."""
        cache = self.cache
        if cache is None:
            return
        if self.slot is not None:
            cache.finish_token()
            return
        layers = cache.producers
        cache.write_chunk(
            torch.stack([self.produced[layer].new_keys for layer in layers]).detach(),
            torch.stack([self.produced[layer].new_raw_keys for layer in layers]).detach(),
            torch.stack([self.produced[layer].new_values for layer in layers]).detach(),
            token_ids,
            padding,
        )

    # ---- attention ----------------------------------------------------------------------------
    def attend(self, query: torch.Tensor, source: int, no_diagonal: bool, sliding: bool) -> torch.Tensor:
        """Attention of raw (un-rotated) queries [batch, heads, T, dim] over the KV of layer `source`."""
        kv = self.read(source, query)
        if self.decode_kernel:
            return _unfold_heads(self._kernel_attention(query, kv, source, no_diagonal, sliding), self.groups)
        rotated = apply_rope(query, self.query_cos, self.query_sin)
        if self.cache is None and not sliding and not self.padded:
            return _causal_attention(rotated, kv.keys, kv.values, no_diagonal)
        mask, has_key = self._mask(no_diagonal, sliding, self.cache is not None and self.cache.on_ring(source))
        folded = _fold_heads(rotated, self.groups)
        if self.cpu_kernel:
            # One token per row: the row's folded query rows all see the same slots.
            cache = self.cache
            sinks = (cache.sink_keys[cache.row(source)], self.sink_cos, self.sink_sin) if cache.sink else ()
            out = torch.ops.lckv.decode_attention(folded, kv.keys, kv.values, mask[:, 0, 0], *sinks)
            return _unfold_heads(out, self.groups)  # rows that see no key are zeros already
        if self.slot is None and self.sink_query_cos is None:
            # A chunk: in the KV's dtype (a cache more compact than the activations, the CPU fast
            # path's, is not widened: half the bytes, and torch's attention kernel is quicker on it).
            out = F.scaled_dot_product_attention(folded.to(kv.keys.dtype), kv.keys, kv.values,
                                                 attn_mask=mask).to(folded.dtype)
        elif self.slot is None:  # a chunk that overflows the cache (it reads the KV in its own way)
            out = None
            if query.device.type in SINK_COPY_DEVICES and not torch.compiler.is_compiling():
                out = self._attention_with_sink_copies(folded, source, (no_diagonal, sliding, self.cache.on_ring(source)))
            if out is None:
                sink_query = _fold_heads(apply_rope(query, self.sink_query_cos, self.sink_query_sin), self.groups)
                out = self._attention_with_sink_rescore(folded, sink_query, source, mask)
        else:
            # One token: a cache kept in a more compact dtype than the activations is read in theirs.
            keys, values = kv.keys.to(folded.dtype), kv.values.to(folded.dtype)
            if query.device.type in SPLIT_DECODE_DEVICES and torch.compiler.is_compiling():
                out = _decode_attention(folded, keys, values, mask)
            else:
                out = F.scaled_dot_product_attention(folded, keys, values, attn_mask=mask)
        out = out.masked_fill(~has_key, 0.0)  # a query that sees no key gets a zero output
        return _unfold_heads(out, self.groups)

    def _kernel_attention(
        self, query: torch.Tensor, kv: ProducedKV, source: int, no_diagonal: bool, sliding: bool
    ) -> torch.Tensor:
        """One token's attention through the Triton decode kernel (RoPE and masks inside it)."""
        cache = self.cache
        batch, dim = query.shape[0], query.shape[-1]
        cos, sin = self.query_cos.reshape(batch, dim), self.query_sin.reshape(batch, dim)
        if cache.sink:
            sink_keys, sink_cos, sink_sin = cache.sink_keys[cache.row(source)], self.sink_cos, self.sink_sin
        else:  # nothing to rotate: any tensors of the right kind
            sink_keys, sink_cos, sink_sin = kv.keys, cos, sin
        return decode_kernel.decode_attention(
            _fold_heads(query, self.groups).contiguous(), cos, sin, kv.keys, kv.values, sink_keys, sink_cos,
            sink_sin, cache.token_index, self.query_index[:, 0], cache.sink, cache.window,
            self.sliding_window if sliding else 0, no_diagonal,
        )

    def cached_columns(self, ring: bool) -> int:
        """A chunk's cached key columns in the full buffers, or the ring's with `ring` (not a bool index
        into `columns`: torch 2.11's compiler raises on one, and the chunk's compile fails)."""
        return self.columns[1] if ring else self.columns[0]

    def _key_index(self, ring: bool = False) -> torch.Tensor:
        """Stream index of each key column: the cache's slots (the ring's with `ring`), then the new tokens."""
        cache = self.cache
        cached = cache.ring_index if ring else cache.token_index
        if self.slot is not None:
            return cached
        return torch.cat((cached[:, : self.cached_columns(ring)], self.query_index), dim=1)

    def _mask(self, no_diagonal: bool, sliding: bool, ring: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Visibility [batch, 1, groups*T, keys] (heads folded) and whether each row sees any key;
        `ring`: over the sliding-window producers' shorter buffers."""
        key = (no_diagonal, sliding, ring)
        if key not in self._masks:
            q = self.query_index.unsqueeze(2)
            if self.cache is None:
                k = self.query_index.unsqueeze(1)
                visible = k >= 0
            else:
                k = self._key_index(ring).unsqueeze(1)
                visible = self.cache.visible(q, k)
            visible = visible & ((k < q) if no_diagonal else (k <= q))
            if sliding:
                visible = visible & (k > q - self.sliding_window)
            visible = visible.unsqueeze(1).repeat(1, 1, self.groups, 1)
            self._masks[key] = (visible, visible.any(dim=-1, keepdim=True))
        return self._masks[key]

    def _attention_with_sink_rescore(
        self, query: torch.Tensor, sink_query: torch.Tensor, source: int, mask: torch.Tensor
    ) -> torch.Tensor:
        """Attention where sink columns are scored in each query's own cache frame."""
        cache = self.cache
        columns, is_sink, _, _ = self._sink_columns(cache.on_ring(source))
        kv = self.produced[source]
        sink_keys = self._sink_keys(source)  # rotated at their own index s (the query at t - shift(t))
        scale = query.shape[-1] ** -0.5
        scores = torch.matmul(query, kv.keys.to(query.dtype).transpose(-1, -2)) * scale
        sink_scores = torch.matmul(sink_query, sink_keys.transpose(-1, -2)) * scale
        scores[..., columns] = torch.where(is_sink, sink_scores, scores[..., columns])
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).nan_to_num(0.0).to(query.dtype)
        return torch.matmul(probs, kv.values.to(query.dtype))

    def _attention_with_sink_copies(self, query: torch.Tensor, source: int,
                                    mask_key: tuple[bool, bool, bool]) -> torch.Tensor | None:
        """What `_attention_with_sink_rescore` computes, as one call of torch's attention in the KV's
        dtype (eager calls only: it reads on the host which columns hold sinks). A sink s scored in
        query t's cache frame, (R(t - shift_t) q) . (R(s) k), equals (R(t) q) . (R(s + shift_t) k):
        so each query gets its own copy of the sink keys rotated by its shift, visible to it alone,
        and the sink columns themselves are masked. None where those copies would outnumber the
        columns (long chunks with many sinks): the re-scoring path serves."""
        plan = self._sink_copy_plan(mask_key)
        if plan is None:
            return None
        kv = self.produced[source]
        sinks, columns, shift_cos, shift_sin, mask = plan
        batch, heads, _, dim = query.shape
        # The sink keys rotated at their own index s, then by each query's shift.
        own = self._sink_keys(source)[:, :, sinks].to(self.dtype).unsqueeze(2)  # [batch, kv_heads, 1, sinks, dim]
        copies = own * shift_cos + rotate_half(own) * shift_sin
        copies = copies.reshape(batch, heads, -1, dim).to(kv.keys.dtype)  # T * sinks columns, T major
        values = kv.values[:, :, columns].unsqueeze(2).expand(-1, -1, self.steps, -1, -1).reshape(batch, heads, -1, dim)
        out = F.scaled_dot_product_attention(query.to(kv.keys.dtype), torch.cat((kv.keys, copies), dim=2),
                                             torch.cat((kv.values, values), dim=2), attn_mask=mask)
        return out.to(query.dtype)

    def _sink_keys(self, source: int) -> torch.Tensor:
        """The keys of the columns that may hold a sink (`_sink_columns`), each rotated at its own
        index s: the cached sinks (kept raw) rotated here, then the chunk's new tokens (rotated already)."""
        cache = self.cache
        columns, _, cos, sin = self._sink_columns(cache.on_ring(source))
        cached_sinks = apply_rope(cache.sink_keys[cache.row(source)], cos, sin)
        return torch.cat((cached_sinks, self.produced[source].new_keys[:, :, : columns.numel() - cache.sink]), dim=2)

    def _sink_copy_plan(self, mask_key: tuple[bool, bool, bool]) -> tuple | None:
        """Once per call and mask: which sink columns get copies (those holding a sink in some row),
        the RoPE of each query's shift, and the mask over the columns then the copies."""
        if mask_key not in self._sink_copy_plans:
            mask, _ = self._mask(*mask_key)
            columns, is_sink, _, _ = self._sink_columns(mask_key[2])
            batch, _, rows, keys = mask.shape
            steps = self.steps
            sinks = is_sink.reshape(batch, -1).any(dim=0).nonzero().squeeze(1)
            if sinks.numel() * steps > keys:
                self._sink_copy_plans[mask_key] = None
                return None
            columns, is_sink = columns[sinks], is_sink[..., sinks]
            shift_cos, shift_sin = self.rope(self.shift, self.dtype)  # [batch, T, dim]
            # Query row r is token r % T (heads folded as groups * T rows); it sees its own copies only.
            own_query = (torch.arange(rows, device=mask.device) % steps).view(rows, 1) == torch.arange(steps, device=mask.device)
            copy_mask = own_query.view(1, 1, rows, steps, 1) & mask[..., columns].unsqueeze(3) & is_sink.unsqueeze(3)
            plain_mask = mask.clone()
            plain_mask[..., columns] &= ~is_sink
            self._sink_copy_plans[mask_key] = (
                sinks, columns, shift_cos[:, None, :, None], shift_sin[:, None, :, None],
                torch.cat((plain_mask, copy_mask.reshape(batch, 1, rows, -1)), dim=3))
        return self._sink_copy_plans[mask_key]

    def _sink_columns(self, ring: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For re-scoring, once per call and buffer length: the key columns that may hold a sink (the
        cached sink slots, then the new tokens that are sinks), whether each does [batch, 1, 1,
        columns], and the RoPE of the sinks at their own index. Built on the device: no host round
        trip per layer."""
        if ring not in self._sink_plans:
            cache = self.cache
            device = self.query_index.device
            capacity = self.cached_columns(ring)  # where the new tokens' columns start
            new_sinks = min(cache.sink + self.most_padding, self.steps)  # a row's sinks follow its padding
            columns = torch.cat((torch.arange(cache.sink, device=device),
                                 torch.arange(capacity, capacity + new_sinks, device=device)))
            column_index = self._key_index(ring)[:, columns]
            is_sink = cache.is_sink(column_index).unsqueeze(1).unsqueeze(1)
            cos, sin = self.rope(torch.arange(cache.sink, device=device).unsqueeze(0), self.dtype)
            self._sink_plans[ring] = (columns, is_sink, cos, sin)
        return self._sink_plans[ring]


def _capturing(tensor: torch.Tensor) -> bool:
    """Whether this call is being captured in a CUDA graph (no host sync may happen)."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()  # untraceable: test is_compiling first


def choose_attention_backend(cache: SinkWindowCache) -> str:
    """The attention of one-token steps on this cache, chosen once when a step is built: "triton"
    (the decode kernel) for a 16-bit cache on CUDA with Triton and no sliding-window ring, unless
    LCKV_DECODE_KERNEL=0; "cpu" (`torch.ops.lckv.decode_attention`) for a float32 or bfloat16 cache
    on a CPU where the CPU kernels build, unless LCKV_CPU_ATTENTION=0; else "torch". Sets it on the
    cache and returns it."""
    # The kernel reads one slot layout; producers on a sliding-window ring have another.
    triton = (decode_kernel.AVAILABLE and cache.device.type == "cuda" and cache.dtype in decode_kernel.HALF_TYPES
              and not cache.ring_layers and os.environ.get("LCKV_DECODE_KERNEL", "1") != "0")
    cpu = (cache.device.type == "cpu" and cache.dtype in int8_kernel.DECODE_ATTENTION_TYPES
           and os.environ.get("LCKV_CPU_ATTENTION", "1") != "0" and int8_kernel.available())
    cache.attention_backend = "triton" if triton else "cpu" if cpu else "torch"
    return cache.attention_backend


DECODE_SPLIT = 64  # cache slots per partial softmax in the compiled decode attention
# Where a compiled one-token step uses it: on a CPU, Inductor's C++ for it took 3 ms a layer against
# 0.15 ms for torch's fused attention, which the compiled CPU step calls instead (or the CPU kernel,
# with the "cpu" backend).
SPLIT_DECODE_DEVICES: tuple[str, ...] = ("cuda",)
# Devices whose eager chunks past the window score the sinks through per-query copies of the sink
# keys in one call of torch's attention (`_attention_with_sink_copies`): on a CPU about twice as
# quick as re-scoring in float32. Compiled and captured calls keep the re-scoring path.
SINK_COPY_DEVICES: tuple[str, ...] = ("cpu",)


def _decode_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """One token's attention over the whole cache, split across the slots (flash-decoding style).

    A decode step has only (batch x kv heads x query heads per KV head) query rows; a kernel per row
    would leave the GPU idle. So the slots are cut in blocks of DECODE_SPLIT: each block gets its own
    softmax statistics, and the blocks are combined at the end. Written as broadcasts and sums, which
    the compiler turns into a few wide, fused reduction kernels.
    query [b, kvh, rows, d]; keys, values [b, kvh, slots, d]; mask [b, 1, rows, slots].
    """
    b, kvh, rows, d = query.shape
    slots = keys.shape[2]
    pad = -slots % DECODE_SPLIT
    if pad:
        keys, values = F.pad(keys, (0, 0, 0, pad)), F.pad(values, (0, 0, 0, pad))
        mask = F.pad(mask, (0, pad), value=False)
    blocks = (slots + pad) // DECODE_SPLIT
    keys = keys.view(b, kvh, blocks, 1, DECODE_SPLIT, d).float()
    values = values.view(b, kvh, blocks, 1, DECODE_SPLIT, d).float()
    mask = mask.view(b, 1, rows, blocks, DECODE_SPLIT).transpose(2, 3)  # [b, 1, blocks, rows, split]
    q = query.float().view(b, kvh, 1, rows, 1, d)
    scores = (q * keys).sum(-1) * d**-0.5  # [b, kvh, blocks, rows, split]
    scores = scores.masked_fill(~mask, float("-inf"))
    # A block with no visible slot gets a finite max, so that it contributes exp(-inf) = 0, not NaN.
    block_max = scores.amax(-1, keepdim=True).clamp(min=-1e30)
    weights = torch.exp(scores - block_max)
    block_sum = weights.sum(-1, keepdim=True)
    block_out = (weights.unsqueeze(-1) * values).sum(-2)  # [b, kvh, blocks, rows, d]
    top = block_max.amax(2, keepdim=True)
    scale = torch.exp(block_max - top)
    out = (block_out * scale).sum(2) / (block_sum * scale).sum(2)  # rows with no key: NaN, zeroed later
    return out.to(query.dtype)


def _fold_heads(query: torch.Tensor, groups: int) -> torch.Tensor:
    """[batch, heads, T, dim] -> [batch, kv_heads, groups*T, dim]: heads sharing a KV head become rows."""
    b, h, t, d = query.shape
    return query.reshape(b, h // groups, groups * t, d)


def _unfold_heads(out: torch.Tensor, groups: int) -> torch.Tensor:
    b, kvh, gt, d = out.shape
    return out.reshape(b, kvh * groups, gt // groups, d)


def _causal_attention(
    query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, no_diagonal: bool
) -> torch.Tensor:
    """Plain causal attention without a cache (training, full-sequence encoding): fused kernels."""
    gqa = query.shape[1] != keys.shape[1]
    if not no_diagonal:
        return F.scaled_dot_product_attention(query, keys, values, is_causal=True, enable_gqa=gqa)
    # Without the diagonal, query t sees keys < t: causal attention of queries 1.. over keys ..T-1.
    # Query 0 sees nothing and gets a zero output.
    first = query.new_zeros(query[:, :, :1].shape)
    if query.shape[2] == 1:
        return first
    rest = F.scaled_dot_product_attention(
        query[:, :, 1:], keys[:, :, :-1], values[:, :, :-1], is_causal=True, enable_gqa=gqa
    )
    return torch.cat((first, rest), dim=2)
