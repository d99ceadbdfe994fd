"""The condensed attention-sink + sliding-window KV cache (StreamingLLM over LCKV).

Only the KV-producing layers are stored, in fixed-size buffers: `sink` first tokens plus a ring of the
`window` most recent ones. Keys are kept *before* RoPE; the model rotates them by their place in the
cache at attention time, so eviction never rewrites stored keys.
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

    def layer_keys(self, layer: int) -> torch.Tensor:
        """Un-rotated keys of a producer layer, [batch, kv_heads, capacity, head_dim]."""
        return self.keys[self._row[layer]]

    def layer_values(self, layer: int) -> torch.Tensor:
        return self.values[self._row[layer]]

    def slot_of(self, index: torch.Tensor) -> torch.Tensor:
        """Slot of each stream index (any shape)."""
        ring = self.sink + torch.remainder(index - self.sink, self.window)
        return torch.where(index < self.sink, index, ring)

    # ---- writing ------------------------------------------------------------------------------
    def append(self, keys: torch.Tensor, values: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Append T new tokens for every producer layer.

        keys/values: [producers, batch, kv_heads, T, head_dim] (keys before RoPE); token_ids: [batch, T].
        A one-token append runs on the device alone (no host sync), so it can live in a CUDA graph.
        """
        steps = token_ids.shape[1]
        if steps == 1:
            self._append_one(keys, values, token_ids)
        else:
            self._append_many(keys, values, token_ids)
        self.seen += steps

    def _append_one(self, keys: torch.Tensor, values: torch.Tensor, token_ids: torch.Tensor) -> None:
        slot = self.slot_of(self.seen)  # [batch]
        p, b, h, _, d = keys.shape
        index = slot.view(1, b, 1, 1, 1).expand(p, b, h, 1, d)
        self.keys.scatter_(3, index, keys)
        self.values.scatter_(3, index, values)
        self.token_index.scatter_(1, slot.view(b, 1), self.seen.view(b, 1))
        self.token_ids.scatter_(1, slot.view(b, 1), token_ids)

    def _append_many(self, keys: torch.Tensor, values: torch.Tensor, token_ids: torch.Tensor) -> None:
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

    # ---- state --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything, keeping the buffers."""
        self.keys.zero_()
        self.values.zero_()
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
        )


_STATE = ("keys", "values", "token_index", "token_ids", "seen")


def validate_cache_size(sink: int, window: int) -> None:
    """Raise ValueError naming the bad setting."""
    if not isinstance(sink, int) or isinstance(sink, bool) or sink < 0:
        raise ValueError(f"sink must be a whole number >= 0, got {sink!r}")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be a whole number >= 1, got {window!r}")
