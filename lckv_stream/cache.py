"""The condensed attention-sink + sliding-window KV cache (StreamingLLM over LCKV).

Only the KV-producing layers are stored, in fixed-size buffers (one per producer layer): `sink` first
tokens plus a ring of the `window` most recent ones. Window keys are stored rotated (RoPE) at their
absolute stream index: what attention needs is the distance between query and key, which eviction
never changes for them. Sink keys are also kept un-rotated, because their distance to the query
shrinks as the cache shifts; the model re-rotates those few before each call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

# Sentinel stream index of an empty slot.
EMPTY = -1


@dataclass(frozen=True)
class CacheStats:
    """What the cache holds, for one sequence (row 0) unless said otherwise."""

    tokens_held: int
    tokens_seen: int
    allocated_bytes: int
    used_bytes: int
    dense_bytes: int
    kv_layers: int
    total_layers: int
    sink: int
    window: int

    @property
    def allocated_mb(self) -> float:
        return self.allocated_bytes / 2**20

    @property
    def used_mb(self) -> float:
        return self.used_bytes / 2**20

    @property
    def dense_mb(self) -> float:
        return self.dense_bytes / 2**20


class SinkWindowCache:
    """Static buffers for the KV of the producer layers: `sink` pinned tokens + a ring of `window`.

    Slot of stream token t: t if t < sink, else sink + (t - sink) mod window. Writing a token into the
    ring evicts the token `window` places before it, exactly the StreamingLLM policy.
    """

    def __init__(
        self,
        producers: Sequence[int],
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        sink: int,
        window: int,
        batch_size: int = 1,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        validate_cache_size(sink, window)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.producers = tuple(producers)
        self.num_layers = num_layers
        self.sink = int(sink)
        self.window = int(window)
        self.capacity = self.sink + self.window
        self.batch_size = batch_size
        # One buffer per producer layer: a compiled decode step then writes each in place; slices of
        # one stacked buffer would make it copy the whole stack at every write.
        shape = (batch_size, num_kv_heads, self.capacity, head_dim)
        sink_shape = (batch_size, num_kv_heads, self.sink, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.producers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.producers]
        self.sink_keys = [torch.zeros(sink_shape, dtype=dtype, device=device) for _ in self.producers]
        self.token_index = torch.full((batch_size, self.capacity), EMPTY, dtype=torch.long, device=device)
        self.token_ids = torch.zeros((batch_size, self.capacity), dtype=torch.long, device=device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._row = {layer: i for i, layer in enumerate(self.producers)}
        # Index tensors for writes: every write indexes a whole buffer (never a view of it), which
        # lets a compiled step update the buffers in place instead of copying them.
        self._batch_rows = torch.arange(batch_size, device=device).view(-1, 1)
        self._heads = torch.arange(num_kv_heads, device=device).view(1, -1)
        self._sink_slots = torch.arange(self.sink, device=device)

    @classmethod
    def for_model(
        cls,
        config,
        sink: int,
        window: int,
        batch_size: int = 1,
        dtype: torch.dtype | None = None,
        device: torch.device | str = "cpu",
    ) -> "SinkWindowCache":
        """A cache shaped for `config` (an LCKVLlamaConfig)."""
        return cls(
            producers=config.layer_map.producers,
            num_layers=config.num_hidden_layers,
            num_kv_heads=config.num_key_value_heads,
            head_dim=config.head_dim,
            sink=sink,
            window=window,
            batch_size=batch_size,
            dtype=dtype or torch.float32,
            device=device,
        )

    # ---- layout -------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.token_index.device

    @property
    def dtype(self) -> torch.dtype:
        return self.keys[0].dtype

    def row(self, layer: int) -> int:
        """Index of a producer layer in the per-layer buffer lists."""
        return self._row[layer]

    def layer_keys(self, layer: int) -> torch.Tensor:
        """Rotated keys of a producer layer, [batch, kv_heads, capacity, head_dim]."""
        return self.keys[self._row[layer]]

    def layer_values(self, layer: int) -> torch.Tensor:
        return self.values[self._row[layer]]

    def slot_of(self, index: torch.Tensor) -> torch.Tensor:
        """Slot of each stream index (any shape)."""
        ring = self.sink + torch.remainder(index - self.sink, self.window)
        return torch.where(index < self.sink, index, ring)

    # ---- writing: one token (decode) -----------------------------------------------------------
    def claim_next_slot(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Mark the slot of the next token (evicting its previous holder); returns slots [batch].

        Runs on the device alone (no host sync), so a decode step can live in a CUDA graph.
        """
        slot = self.slot_of(self.seen)
        rows = slot.view(-1, 1)
        self.token_index.scatter_(1, rows, self.seen.view(-1, 1))
        self.token_ids.scatter_(1, rows, token_ids.view(-1, 1))
        return slot

    def write_token(self, layer: int, slot: torch.Tensor, keys: torch.Tensor, raw_keys: torch.Tensor,
                    values: torch.Tensor) -> None:
        """Store one token's KV [batch, kv_heads, 1, dim] of a producer layer at `slot` [batch]."""
        row = self._row[layer]
        at = (self._batch_rows, self._heads, slot.view(-1, 1))
        self.keys[row].index_put_(at, keys[:, :, 0])
        self.values[row].index_put_(at, values[:, :, 0])
        if self.sink:
            # Only a sink's raw key is kept; other tokens land in a clamped slot that is never read.
            sink_keys = self.sink_keys[row]
            at_sink = (self._batch_rows, self._heads, slot.clamp(max=self.sink - 1).view(-1, 1))
            is_sink = (slot < self.sink).view(-1, 1, 1)
            sink_keys.index_put_(at_sink, torch.where(is_sink, raw_keys[:, :, 0], sink_keys[at_sink]))

    def write_rotated_sinks(self, rotated: torch.Tensor) -> None:
        """Overwrite the sink slots' keys with `rotated` [producers, batch, kv_heads, sink, dim]."""
        at = (self._batch_rows.view(-1, 1, 1), self._heads.view(1, -1, 1), self._sink_slots.view(1, 1, -1))
        for keys, rotated_keys in zip(self.keys, rotated):
            keys.index_put_(at, rotated_keys)

    def finish_token(self) -> None:
        self.seen += 1

    # ---- writing: many tokens (prefill) ---------------------------------------------------------
    def write_chunk(self, keys: torch.Tensor, raw_keys: torch.Tensor, values: torch.Tensor,
                    token_ids: torch.Tensor) -> None:
        """Append T tokens for every producer: [producers, batch, kv_heads, T, dim]; token_ids [batch, T]."""
        steps = token_ids.shape[1]
        if steps <= self.window:
            self._write_short_chunk(keys, raw_keys, values, token_ids)
            return
        for row, start in enumerate(self.seen.tolist()):
            index = torch.arange(start, start + steps, device=self.device)
            # Only the sinks and the last `window` tokens of the chunk survive; skip the rest so that no
            # slot is written twice.
            keep = (index < self.sink) | (index >= start + steps - self.window)
            offsets = keep.nonzero().squeeze(1)
            kept = index[offsets]
            slots = self.slot_of(kept)
            sinks = kept < self.sink
            has_sinks = bool(sinks.any())
            for layer in range(len(self.producers)):
                self.keys[layer][row, :, slots] = keys[layer, row, :, offsets]
                self.values[layer][row, :, slots] = values[layer, row, :, offsets]
                if has_sinks:
                    self.sink_keys[layer][row, :, kept[sinks]] = raw_keys[layer, row, :, offsets[sinks]]
            self.token_index[row, slots] = kept
            self.token_ids[row, slots] = token_ids[row, offsets]
        self.seen += steps

    def _write_short_chunk(self, keys: torch.Tensor, raw_keys: torch.Tensor, values: torch.Tensor,
                           token_ids: torch.Tensor) -> None:
        """write_chunk for T <= window: the T new tokens land in T distinct slots, so each buffer is
        written by one scatter on the device, with no host sync (a CUDA graph can capture it)."""
        steps = token_ids.shape[1]
        index = self.seen.view(-1, 1) + torch.arange(steps, device=self.device)  # [batch, T]
        slots = self.slot_of(index)
        at = (self._batch_rows.view(-1, 1, 1), self._heads.view(1, -1, 1), slots.unsqueeze(1))  # [b, h, T]
        for layer in range(len(self.producers)):
            self.keys[layer].index_put_(at, keys[layer])
            self.values[layer].index_put_(at, values[layer])
        if self.sink:
            # Sink s takes the raw key of the chunk's token with index s, where the chunk holds it.
            offset = self._sink_slots.view(1, -1) - self.seen.view(-1, 1)  # [batch, sink]
            holds = ((offset >= 0) & (offset < steps)).unsqueeze(1).unsqueeze(-1)
            batch, heads, _, dim = self.sink_keys[0].shape
            pick = offset.clamp(0, steps - 1).view(batch, 1, self.sink, 1).expand(batch, heads, self.sink, dim)
            for layer, sink_keys in enumerate(self.sink_keys):
                sink_keys.copy_(torch.where(holds, raw_keys[layer].gather(2, pick), sink_keys))
        self.token_index.scatter_(1, slots, index)
        self.token_ids.scatter_(1, slots, token_ids)
        self.seen += steps

    # ---- state --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything, keeping the buffers."""
        for name, buffer in self._state():
            buffer.fill_(EMPTY if name == "token_index" else 0)

    def snapshot(self, into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """A copy of the state, to restore later (undo/regenerate) in O(cache size).

        Pass an earlier snapshot as `into` to reuse its buffers instead of allocating new ones.
        """
        if into is None:
            return {name: buffer.clone() for name, buffer in self._state()}
        for name, buffer in self._state():
            into[name].copy_(buffer)
        return into

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Copy a snapshot back into the existing buffers (no reallocation)."""
        for name, buffer in self._state():
            buffer.copy_(snapshot[name])

    def _state(self) -> list[tuple[str, torch.Tensor]]:
        """Every buffer of the state, named (per-layer buffers as keys.0, keys.1, ...)."""
        named = []
        for name in _STATE:
            value = getattr(self, name)
            if isinstance(value, list):
                named.extend((f"{name}.{i}", buffer) for i, buffer in enumerate(value))
            else:
                named.append((name, value))
        return named

    # ---- accounting ---------------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        """KV bytes one token costs here: producers x 2 x kv_heads x head_dim x element size."""
        _, h, _, d = self.keys[0].shape
        return len(self.keys) * 2 * h * d * self.keys[0].element_size()

    @property
    def dense_bytes_per_token(self) -> int:
        """What one token would cost in a dense Llama cache of the same model (every layer)."""
        return self.bytes_per_token // len(self.producers) * self.num_layers

    def tokens_seen(self, row: int = 0) -> int:
        return int(self.seen[row])

    def tokens_held(self, row: int = 0) -> int:
        return min(self.tokens_seen(row), self.capacity)

    def held_indices(self, row: int = 0) -> list[int]:
        """Stream indices of the tokens held, in stream order."""
        return sorted(i for i in self.token_index[row].tolist() if i != EMPTY)

    @property
    def allocated_bytes(self) -> int:
        return sum(buffer.numel() * buffer.element_size() for _, buffer in self._state())

    def stats(self, row: int = 0) -> CacheStats:
        seen = self.tokens_seen(row)
        return CacheStats(
            tokens_held=self.tokens_held(row),
            tokens_seen=seen,
            allocated_bytes=self.allocated_bytes,
            used_bytes=self.tokens_held(row) * self.bytes_per_token,
            dense_bytes=seen * self.dense_bytes_per_token,
            kv_layers=len(self.producers),
            total_layers=self.num_layers,
            sink=self.sink,
            window=self.window,
        )


_STATE = ("keys", "values", "sink_keys", "token_index", "token_ids", "seen")


def validate_cache_size(sink: int, window: int) -> None:
    """Raise ValueError naming the bad setting."""
    if not isinstance(sink, int) or isinstance(sink, bool) or sink < 0:
        raise ValueError(f"sink must be a whole number >= 0, got {sink!r}")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be a whole number >= 1, got {window!r}")
