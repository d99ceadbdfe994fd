"""The condensed attention-sink + sliding-window KV cache (StreamingLLM over LCKV).

Only the KV-producing layers are stored, in fixed-size buffers: `sink` first tokens plus a ring of the
`window` most recent ones. Window keys are stored rotated (RoPE) at their absolute stream index: what
attention needs is the distance between query and key, which eviction never changes for them. Sink
keys are also kept un-rotated, because their distance to the query shrinks as the cache shifts; the
model re-rotates those few before each call.
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
        shape = (len(self.producers), batch_size, num_kv_heads, self.capacity, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self.sink_keys = torch.zeros(shape[:3] + (self.sink, head_dim), dtype=dtype, device=device)
        self.token_index = torch.full((batch_size, self.capacity), EMPTY, dtype=torch.long, device=device)
        self.token_ids = torch.zeros((batch_size, self.capacity), dtype=torch.long, device=device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        self._row = {layer: i for i, layer in enumerate(self.producers)}

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
        return self.keys.device

    @property
    def dtype(self) -> torch.dtype:
        return self.keys.dtype

    def row(self, layer: int) -> int:
        """Index of a producer layer in the stacked buffers."""
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
        b, h, _, d = keys.shape
        index = slot.view(b, 1, 1, 1).expand(b, h, 1, d)
        row = self._row[layer]
        self.keys[row].scatter_(2, index, keys)
        self.values[row].scatter_(2, index, values)
        if self.sink:
            # Only a sink's raw key is kept; other tokens land in a clamped slot that is never read.
            sink_index = index.clamp(max=self.sink - 1)
            current = self.sink_keys[row].gather(2, sink_index)
            is_sink = (slot < self.sink).view(b, 1, 1, 1)
            self.sink_keys[row].scatter_(2, sink_index, torch.where(is_sink, raw_keys, current))

    def finish_token(self) -> None:
        self.seen += 1

    # ---- writing: many tokens (prefill) ---------------------------------------------------------
    def write_chunk(self, keys: torch.Tensor, raw_keys: torch.Tensor, values: torch.Tensor,
                    token_ids: torch.Tensor) -> None:
        """Append T tokens for every producer: [producers, batch, kv_heads, T, dim]; token_ids [batch, T]."""
        steps = token_ids.shape[1]
        for row, start in enumerate(self.seen.tolist()):
            index = torch.arange(start, start + steps, device=self.device)
            # Only the sinks and the last `window` tokens of the chunk survive; skip the rest so that no
            # slot is written twice.
            keep = (index < self.sink) | (index >= start + steps - self.window)
            offsets = keep.nonzero().squeeze(1)
            kept = index[offsets]
            slots = self.slot_of(kept)
            self.keys[:, row, :, slots] = keys[:, row, :, offsets]
            self.values[:, row, :, slots] = values[:, row, :, offsets]
            self.token_index[row, slots] = kept
            self.token_ids[row, slots] = token_ids[row, offsets]
            sinks = kept < self.sink
            if bool(sinks.any()):
                self.sink_keys[:, row, :, kept[sinks]] = raw_keys[:, row, :, offsets[sinks]]
        self.seen += steps

    # ---- state --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything, keeping the buffers."""
        self.keys.zero_()
        self.values.zero_()
        self.sink_keys.zero_()
        self.token_index.fill_(EMPTY)
        self.token_ids.zero_()
        self.seen.zero_()

    def snapshot(self, into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """A copy of the state, to restore later (undo/regenerate) in O(cache size).

        Pass an earlier snapshot as `into` to reuse its buffers instead of allocating new ones.
        """
        if into is None:
            return {name: getattr(self, name).clone() for name in _STATE}
        for name in _STATE:
            into[name].copy_(getattr(self, name))
        return into

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Copy a snapshot back into the existing buffers (no reallocation)."""
        for name in _STATE:
            getattr(self, name).copy_(snapshot[name])

    # ---- accounting ---------------------------------------------------------------------------
    @property
    def bytes_per_token(self) -> int:
        """KV bytes one token costs here: producers x 2 x kv_heads x head_dim x element size."""
        p, _, h, _, d = self.keys.shape
        return p * 2 * h * d * self.keys.element_size()

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
        return sum(getattr(self, name).numel() * getattr(self, name).element_size() for name in _STATE)

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
