"""Positions, masks and the attention kernel for one forward call.

A forward call encodes T new tokens per row, optionally on top of a `SinkWindowCache`. Keys are
[cache slots | new tokens]; which ones a query may see follows from stream indices alone:

    visible(t, s) = s held  and  s <= t (s < t without diagonal)  and  (s < sink or s > t - window)

Positions follow StreamingLLM: place in the cache, not in the text. For query t the cache has shifted
by shift(t) = max(0, t + 1 - capacity); a window key s sits at s - shift(t), a sink key at s, the
query at t - shift(t). Window keys keep their true distance t - s for every query, so all queries of a
call share one frame (base = shift of the last query). Only sink keys need per-query positions, and
only when the cache overflows inside a multi-token call: those few columns are re-scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .cache import SinkWindowCache


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [batch, heads, n, dim] by cos/sin [batch, n, dim] (the Llama convention)."""
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


@dataclass
class ProducedKV:
    """One producer layer's KV in this call: raw new-token KV, plus the keys/values attention reads."""

    new_keys: torch.Tensor  # [batch, kv_heads, T, dim], before RoPE
    new_values: torch.Tensor
    keys: torch.Tensor  # [batch, kv_heads, cache + T, dim], rotated
    values: torch.Tensor


@dataclass
class ForwardContext:
    """Everything the layers of one forward call share: positions, masks, and the producers' KV."""

    cache: SinkWindowCache | None
    steps: int
    groups: int  # query heads per KV head
    query_cos: torch.Tensor
    query_sin: torch.Tensor
    key_cos: torch.Tensor  # positions of [cache | new] keys (new keys only without a cache)
    key_sin: torch.Tensor
    query_index: torch.Tensor | None = None  # [batch, T] stream index of each new token
    key_index: torch.Tensor | None = None  # [batch, cache + T]
    sink_query_cos: torch.Tensor | None = None  # set when sink columns need re-scoring
    sink_query_sin: torch.Tensor | None = None
    sliding_window: int = 0
    produced: dict[int, ProducedKV] = field(default_factory=dict)
    _masks: dict[tuple[bool, bool], tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    _cache_keys: dict[int, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        rotary,
        cache: SinkWindowCache | None,
        batch: int,
        steps: int,
        groups: int,
        sliding_window: int,
        like: torch.Tensor,
    ) -> "ForwardContext":
        """Compute positions for T new tokens per row; `rotary` maps positions to cos/sin."""
        device = like.device
        offsets = torch.arange(steps, device=device)
        if cache is None:
            positions = offsets.unsqueeze(0).expand(batch, steps)
            cos, sin = rotary(like, positions)
            return cls(None, steps, groups, cos, sin, cos, sin, sliding_window=sliding_window)

        query_index = cache.seen.unsqueeze(1) + offsets  # [batch, T]
        shift = (query_index + 1 - cache.capacity).clamp(min=0)
        base = shift[:, -1:]
        key_index = torch.cat((cache.token_index, query_index), dim=1)
        key_positions = torch.where(key_index < cache.sink, key_index, key_index - base)
        query_cos, query_sin = rotary(like, query_index - base)
        key_cos, key_sin = rotary(like, key_positions)
        context = cls(
            cache, steps, groups, query_cos, query_sin, key_cos, key_sin,
            query_index=query_index, key_index=key_index, sliding_window=sliding_window,
        )
        # Decode (T = 1) has base == shift(t): one frame is exact and nothing needs a host sync.
        if steps > 1 and cache.sink > 0 and bool((shift[:, 0] != base[:, 0]).any()):
            context.sink_query_cos, context.sink_query_sin = rotary(like, query_index - shift)
        return context

    # ---- producers' KV ------------------------------------------------------------------------
    def produce(self, layer: int, new_keys: torch.Tensor, new_values: torch.Tensor) -> None:
        """Record a producer layer's new KV (keys before RoPE) for readers and for the cache."""
        new_cos = self.key_cos[:, -self.steps :]
        new_sin = self.key_sin[:, -self.steps :]
        rotated = apply_rope(new_keys, new_cos, new_sin)
        if self.cache is None:
            keys, values = rotated, new_values
        else:
            keys = torch.cat((self._rotated_cache_keys(layer), rotated), dim=2)
            values = torch.cat((self.cache.layer_values(layer), new_values), dim=2)
        self.produced[layer] = ProducedKV(new_keys, new_values, keys, values)

    def read(self, layer: int, like: torch.Tensor) -> ProducedKV:
        """The KV a reader of `layer` sees; zeros for new tokens when the layer has not run yet
        (first iteration of a layer reading from above: that KV does not exist yet)."""
        if layer not in self.produced:
            batch, heads, _, dim = like.shape
            zeros = like.new_zeros(batch, heads // self.groups, self.steps, dim)
            self.produce(layer, zeros, zeros)
        return self.produced[layer]

    def _rotated_cache_keys(self, layer: int) -> torch.Tensor:
        # The cache part is the same in every iteration: rotate it once per call.
        if layer not in self._cache_keys:
            capacity = self.cache.capacity
            self._cache_keys[layer] = apply_rope(
                self.cache.layer_keys(layer), self.key_cos[:, :capacity], self.key_sin[:, :capacity]
            )
        return self._cache_keys[layer]

    def new_kv_for_cache(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Stacked raw KV of every producer, [producers, batch, kv_heads, T, dim]."""
        producers = self.cache.producers
        return (
            torch.stack([self.produced[layer].new_keys for layer in producers]),
            torch.stack([self.produced[layer].new_values for layer in producers]),
        )

    # ---- attention ----------------------------------------------------------------------------
    def attend(
        self, query: torch.Tensor, kv: ProducedKV, no_diagonal: bool, sliding: bool
    ) -> torch.Tensor:
        """Attention of raw (un-rotated) queries [batch, heads, T, dim] over a producer's KV."""
        rotated = apply_rope(query, self.query_cos, self.query_sin)
        if self.cache is None and not sliding:
            return _causal_attention(rotated, kv.keys, kv.values, no_diagonal)
        mask, has_key = self._mask(no_diagonal, sliding)
        folded = _fold_heads(rotated, self.groups)
        if self.sink_query_cos is None:
            out = F.scaled_dot_product_attention(folded, kv.keys, kv.values, attn_mask=mask)
        else:
            sink_query = _fold_heads(apply_rope(query, self.sink_query_cos, self.sink_query_sin), self.groups)
            out = self._attention_with_sink_rescore(folded, sink_query, kv, mask)
        out = out.masked_fill(~has_key, 0.0)  # a query that sees no key gets a zero output
        return _unfold_heads(out, self.groups)

    def _mask(self, no_diagonal: bool, sliding: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Visibility [batch, 1, groups*T, keys] (heads folded) and whether each row sees any key."""
        key = (no_diagonal, sliding)
        if key not in self._masks:
            if self.cache is None:
                index = torch.arange(self.steps, device=self.query_cos.device)
                query_index, key_index = index.unsqueeze(0), index.unsqueeze(0)
                sink, window = 0, self.steps + 1
            else:
                query_index, key_index = self.query_index, self.key_index
                sink, window = self.cache.sink, self.cache.window
            q = query_index.unsqueeze(2)
            k = key_index.unsqueeze(1)
            visible = (k >= 0) & ((k < q) if no_diagonal else (k <= q))
            visible &= (k < sink) | (k > q - window)
            if sliding:
                visible &= k > q - self.sliding_window
            visible = visible.unsqueeze(1).repeat(1, 1, self.groups, 1)
            self._masks[key] = (visible, visible.any(dim=-1, keepdim=True))
        return self._masks[key]

    def _attention_with_sink_rescore(
        self, query: torch.Tensor, sink_query: torch.Tensor, kv: ProducedKV, mask: torch.Tensor
    ) -> torch.Tensor:
        # Sink keys sit in cache slots [0, sink) and, early in a stream, among the first new tokens.
        capacity, sink = self.cache.capacity, self.cache.sink
        columns = torch.cat((
            torch.arange(sink, device=query.device),
            capacity + torch.arange(min(sink, self.steps), device=query.device),
        ))
        scale = query.shape[-1] ** -0.5
        scores = torch.matmul(query, kv.keys.transpose(-1, -2)) * scale
        sink_scores = torch.matmul(sink_query, kv.keys[:, :, columns].transpose(-1, -2)) * scale
        column_index = self.key_index[:, columns]
        is_sink = ((column_index >= 0) & (column_index < sink)).view(column_index.shape[0], 1, 1, -1)
        scores[..., columns] = torch.where(is_sink, sink_scores, scores[..., columns])
        scores = scores.masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).nan_to_num(0.0).to(query.dtype)
        return torch.matmul(probs, kv.values)


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
