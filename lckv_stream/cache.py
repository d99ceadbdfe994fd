"""The condensed attention-sink + sliding-window KV cache (StreamingLLM over LCKV).

Only the KV-producing layers are stored, in fixed-size buffers (one per producer layer). The buffers
have a bucket's shape: `sink` slots for pinned first tokens, then `window` slots for a ring of recent
ones. Each row (one conversation) may use a smaller sink and window of its own inside that shape:
its sinks fill slots [0, row sink), its ring starts at slot `sink` and spans its own window, and the
slots it never uses stay empty (stream index -1), which masks them everywhere. So conversations of
different sizes share one buffer, one compiled step and one captured graph.

Window keys are stored rotated (RoPE) at their absolute stream index: what attention needs is the
distance between query and key, which eviction never changes for them. Sink keys are also kept
un-rotated, because their distance to the query shrinks as the cache shifts; the model re-rotates
those few before each call.

A producer layer read only by sliding-window (`s`) layers needs no more than `sliding_window` recent
tokens: when that is less than the window, its buffers are shorter (its "ring": the same sink slots,
then a ring of min(sliding_window, row window) slots, with its own stream index per slot). It follows
the same policy with the shorter window; the other producers hold the full window.

`SinkWindowCache` is also the eviction policy: which slot a stream index takes (`slot_of`), how far
each row's frame has shifted (`shift`), which keys a query may see (`visible`) and which tokens of a
long chunk survive (`kept_in_chunk`). Attention code and the decode kernel consume those answers; a
new policy is a subclass that gives other ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .packed_state import ALIGN, BLOCK, carve, packed_bytes, specs_of

# Sentinel stream index of an empty slot.
EMPTY = -1


@dataclass(frozen=True)
class CacheStats:
    """What one row of the cache holds (row 0 unless said otherwise)."""

    tokens_held: int
    tokens_seen: int
    allocated_bytes: int  # the row's share of the buffers (its bucket's full shape)
    used_bytes: int
    dense_bytes: int
    kv_layers: int
    total_layers: int
    sink: int  # the row's own sizes
    window: int
    sliding_kv_layers: int = 0  # KV layers read only by sliding-window layers, which keep fewer tokens
    sliding_tokens_held: int = 0  # tokens those layers hold (at most sink + sliding_window)

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
    """Static buffers for the KV of the producer layers: `sink` pinned slots + a ring of `window`.

    Slot of stream token t in a row with sink s and window w: t if t < s, else
    sink + (t - s) mod w. Writing a token into the ring evicts the token w places before it, exactly
    the StreamingLLM policy. Rows start at the full shape (s = sink, w = window); `set_row_size`
    gives a row smaller sizes.
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
        sliding_producers: Sequence[int] = (),
        sliding_window: int = 0,
    ) -> None:
        """`sliding_producers`: producers read only by sliding-window layers; they keep
        min(sliding_window, window) recent tokens when that is shorter than the window."""
        validate_cache_size(sink, window)
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.producers = tuple(producers)
        self.num_layers = num_layers
        self.sink = int(sink)
        self.window = int(window)
        self.capacity = self.sink + self.window
        self.batch_size = batch_size
        shorter = 0 < sliding_window < self.window
        self.ring_layers = tuple(layer for layer in self.producers if layer in sliding_producers) if shorter else ()
        self.ring_window = int(sliding_window) if self.ring_layers else 0
        self.ring_capacity = self.sink + self.ring_window
        # One buffer per producer layer: a compiled decode step then writes each in place; slices of
        # one stacked buffer would make it copy the whole stack at every write.
        shapes = [(batch_size, num_kv_heads, self.ring_capacity if layer in self.ring_layers else self.capacity, head_dim)
                  for layer in self.producers]
        sink_shape = (batch_size, num_kv_heads, self.sink, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        self.sink_keys = [torch.zeros(sink_shape, dtype=dtype, device=device) for _ in self.producers]
        self.token_index = torch.full((batch_size, self.capacity), EMPTY, dtype=torch.long, device=device)
        # Stream index of each ring slot (no slots when no producer is on the ring).
        self.ring_index = torch.full((batch_size, self.ring_capacity if self.ring_layers else 0), EMPTY,
                                     dtype=torch.long, device=device)
        self.token_ids = torch.zeros((batch_size, self.capacity), dtype=torch.long, device=device)
        self.seen = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.row_sink = torch.full((batch_size,), self.sink, dtype=torch.long, device=device)
        self.row_window = torch.full((batch_size,), self.window, dtype=torch.long, device=device)
        # Rows that take the next one-token step; the others are left untouched by it (a batched
        # step of a fixed size serves fewer conversations than it has rows).
        self.active = torch.ones(batch_size, dtype=torch.bool, device=device)
        self._sizes = [[self.sink, self.window] for _ in range(batch_size)]  # host copy of row sizes
        self._first = 0  # this object's first row in `_sizes` (views over a row range share them)
        self._row = {layer: i for i, layer in enumerate(self.producers)}
        # Index tensors for writes: every write indexes a whole buffer (never a view of it), which
        # lets a compiled step update the buffers in place instead of copying them.
        self._batch_rows = torch.arange(batch_size, device=device).view(-1, 1)
        self._heads = torch.arange(num_kv_heads, device=device).view(1, -1)
        self._sink_slots = torch.arange(self.sink, device=device)
        # How attention runs for one-token steps: "torch" (any device), "triton" (the CUDA decode
        # kernel) or "cpu" (the CPU one), chosen once by whoever builds the step
        # (attention.choose_attention_backend).
        self.attention_backend = "torch"
        self._staging: list[torch.Tensor] = []  # shared by row views: packed_state's device block
        self.stage_transfers: bool | None = None  # see _stages_transfers
        self._row_views: dict[int, dict[torch.dtype, list[torch.Tensor]]] = {}  # see _row_buffers

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
            sliding_producers=config.layer_map.sliding_only_producers,
            sliding_window=config.sliding_window,
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

    def rows(self, start: int, stop: int) -> "SinkWindowCache":
        """A cache over rows [start, stop) sharing this one's memory: what it writes, this one holds."""
        if not 0 <= start < stop <= self.batch_size:
            raise ValueError(f"rows [{start}, {stop}) are outside a cache of {self.batch_size} rows")
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        for name in _PER_ROW:
            value = getattr(self, name)
            setattr(view, name, [v[start:stop] for v in value] if isinstance(value, list) else value[start:stop])
        view.batch_size = stop - start
        view._first = self._first + start
        view._row_views = {}  # its rows are numbered from `start`
        view._batch_rows = torch.arange(stop - start, device=self.device).view(-1, 1)
        return view

    def gathered(self, index: torch.Tensor) -> "SinkWindowCache":
        """A new cache whose row i is a copy of row index[i] (beam search reorders rows this way)."""
        picked = object.__new__(type(self))
        picked.__dict__.update(self.__dict__)
        for name in _PER_ROW:
            value = getattr(self, name)
            setattr(picked, name, [v.index_select(0, index) for v in value] if isinstance(value, list)
                    else value.index_select(0, index))
        picked.batch_size = index.numel()
        picked._row_views = {}  # buffers of its own
        picked._sizes = [list(self._sizes[self._first + i]) for i in index.tolist()]
        picked._first = 0
        picked._batch_rows = torch.arange(picked.batch_size, device=self.device).view(-1, 1)
        return picked

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

    def on_ring(self, layer: int) -> bool:
        """Whether a producer layer keeps only the sliding window (its buffers are ring_capacity long)."""
        return layer in self.ring_layers

    def layer_keys(self, layer: int) -> torch.Tensor:
        """Rotated keys of a producer layer, [batch, kv_heads, capacity (ring_capacity), head_dim]."""
        return self.keys[self._row[layer]]

    def layer_values(self, layer: int) -> torch.Tensor:
        return self.values[self._row[layer]]

    def row_size(self, row: int = 0) -> tuple[int, int]:
        """(sink, window) of a row."""
        sink, window = self._sizes[self._first + row]
        return sink, window

    def smallest_window(self, ring: bool = False) -> int:
        """The smallest row window (of the sliding-window producers' buffers, with `ring`)."""
        smallest = min(window for _, window in self._sizes[self._first : self._first + self.batch_size])
        return min(smallest, self.ring_window) if ring else smallest

    def _row_window(self, ring: bool) -> torch.Tensor:
        """Each row's window [batch], in the full buffers or in the ring ones."""
        return self.row_window.clamp(max=self.ring_window) if ring else self.row_window

    # ---- the policy -----------------------------------------------------------------------------
    def _per_row(self, values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Row values [batch] shaped to broadcast against `like` [batch, ...]."""
        return values.view((-1,) + (1,) * (like.dim() - 1))

    def slot_of(self, index: torch.Tensor, ring: bool = False) -> torch.Tensor:
        """Slot of each stream index, [batch, ...] (each row with its own sizes), in the full buffers
        or (`ring`) in the sliding-window producers' shorter ones."""
        sink, window = self._per_row(self.row_sink, index), self._per_row(self._row_window(ring), index)
        ring = self.sink + torch.remainder(index - sink, window)
        return torch.where(index < sink, index, ring)

    def shift(self, query_index: torch.Tensor) -> torch.Tensor:
        """How far each query's cache frame has moved, [batch, T]: max(0, t + 1 - row capacity).

        A query t sits at place t - shift, a window key s at s - shift, a sink key at s."""
        capacity = self._per_row(self.row_sink + self.row_window, query_index)
        return (query_index + 1 - capacity).clamp(min=0)

    def visible(self, query_index: torch.Tensor, key_index: torch.Tensor) -> torch.Tensor:
        """Whether query t [batch, T, 1] may see key s [batch, 1, K] under the eviction policy:
        s held and (s a sink or within the window). Causality is the caller's."""
        sink = self._per_row(self.row_sink, query_index)
        window = self._per_row(self.row_window, query_index)
        return (key_index >= 0) & ((key_index < sink) | (key_index > query_index - window))

    def is_sink(self, index: torch.Tensor) -> torch.Tensor:
        """Whether each stream index [batch, ...] is one of its row's sinks."""
        return (index >= 0) & (index < self._per_row(self.row_sink, index))

    def held_columns(self, ring: bool = False) -> int:
        """How many leading slots a chunk's attention must read (the sinks' slots at least): no row
        holds a token past them. Slots fill in order until a ring wraps, so early in a conversation
        this is far less than the capacity. Reads the device on the host: eager calls only."""
        index = self.ring_index if ring else self.token_index
        held = (index != EMPTY).any(dim=0).nonzero()
        return max(self.sink, int(held[-1]) + 1 if held.numel() else 0)

    def kept_in_chunk(self, row: int, start: int, steps: int, ring: bool = False) -> torch.Tensor:
        """Offsets in a chunk of `steps` tokens from stream index `start` that the row keeps: its
        sinks and the last `window` tokens (the rest would be evicted within the chunk); with `ring`,
        the window of the sliding-window producers' buffers."""
        sink, window = self.row_size(row)
        window = min(window, self.ring_window) if ring else window
        index = torch.arange(start, start + steps, device=self.device)
        return ((index < sink) | (index >= start + steps - window)).nonzero().squeeze(1)

    # ---- writing: one token (decode) -----------------------------------------------------------
    def claim_next_slot(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mark the slot of the next token in active rows (evicting its previous holder); returns
        slots [batch] in the full buffers and in the ring ones (None without a ring).

        Runs on the device alone (no host sync), so a decode step can live in a CUDA graph.
        """
        slot = self.slot_of(self.seen)
        rows = slot.view(-1, 1)
        active = self.active.view(-1, 1)
        seen = self.seen.view(-1, 1)
        self.token_index.scatter_(1, rows, torch.where(active, seen, self.token_index.gather(1, rows)))
        self.token_ids.scatter_(1, rows, torch.where(active, token_ids.view(-1, 1), self.token_ids.gather(1, rows)))
        if not self.ring_layers:
            return slot, None
        ring_slot = self.slot_of(self.seen, ring=True)
        ring_rows = ring_slot.view(-1, 1)
        self.ring_index.scatter_(1, ring_rows, torch.where(active, seen, self.ring_index.gather(1, ring_rows)))
        return slot, ring_slot

    def write_token(self, layer: int, slot: torch.Tensor, keys: torch.Tensor, raw_keys: torch.Tensor,
                    values: torch.Tensor) -> None:
        """Store one token's KV [batch, kv_heads, 1, dim] of a producer layer at `slot` [batch] of
        the active rows."""
        row = self._row[layer]
        at = (self._batch_rows, self._heads, slot.view(-1, 1))
        active = self.active.view(-1, 1, 1)
        layer_keys, layer_values = self.keys[row], self.values[row]
        dtype = layer_keys.dtype  # the cache may be kept in a more compact dtype than the activations
        layer_keys.index_put_(at, torch.where(active, keys[:, :, 0].to(dtype), layer_keys[at]))
        layer_values.index_put_(at, torch.where(active, values[:, :, 0].to(dtype), layer_values[at]))
        if self.sink:
            # Only a sink's raw key is kept; other tokens land in a clamped slot that is never read.
            sink_keys = self.sink_keys[row]
            at_sink = (self._batch_rows, self._heads, slot.clamp(max=self.sink - 1).view(-1, 1))
            is_sink = (slot < self.sink).view(-1, 1, 1) & active
            sink_keys.index_put_(at_sink, torch.where(is_sink, raw_keys[:, :, 0].to(dtype), sink_keys[at_sink]))

    def write_rotated_sinks(self, rotated: torch.Tensor) -> None:
        """Overwrite the sink slots' keys with `rotated` [producers, batch, kv_heads, sink, dim]."""
        at = (self._batch_rows.view(-1, 1, 1), self._heads.view(1, -1, 1), self._sink_slots.view(1, 1, -1))
        for keys, rotated_keys in zip(self.keys, rotated):
            keys.index_put_(at, rotated_keys.to(keys.dtype))

    def finish_token(self) -> None:
        self.seen += self.active.long()

    # ---- writing: many tokens (prefill) ---------------------------------------------------------
    def write_chunk(self, keys: torch.Tensor, raw_keys: torch.Tensor, values: torch.Tensor,
                    token_ids: torch.Tensor, padding: list[int] | None = None) -> None:
        """Append T tokens to every row for every producer: [producers, batch, kv_heads, T, dim];
        token_ids [batch, T]. `padding`: per row, how many of the T are left padding, not stored."""
        steps = token_ids.shape[1]
        if torch.compiler.is_compiling():
            # No guard on the rows' own sizes (a compiled chunk serves every row): the caller cuts
            # chunks to fit each row's window, so only the buffers' own bounds are checked here.
            fits = steps <= (min(self.window, self.ring_window) if self.ring_layers else self.window)
        else:
            fits = steps <= self.smallest_window(ring=bool(self.ring_layers))
        if padding is None and fits:
            self._write_short_chunk(keys, raw_keys, values, token_ids)
            return
        padding = padding or [0] * self.batch_size
        keys, raw_keys, values = keys.to(self.dtype), raw_keys.to(self.dtype), values.to(self.dtype)
        for row, start in enumerate(self.seen.tolist()):
            for ring in (False, True) if self.ring_layers else (False,):
                layers = [i for i, layer in enumerate(self.producers) if (layer in self.ring_layers) == ring]
                # Only the sinks and the last `window` tokens of the chunk survive; skip the rest so
                # that no slot is written twice.
                kept = self.kept_in_chunk(row, start, steps - padding[row], ring)
                offsets = kept + padding[row]  # where they are in the chunk
                kept = kept + start
                slots = self.rows(row, row + 1).slot_of(kept.view(1, -1), ring).view(-1)
                sinks = kept < self.row_size(row)[0]
                has_sinks = bool(sinks.any())
                for layer in layers:
                    self.keys[layer][row, :, slots] = keys[layer, row, :, offsets]
                    self.values[layer][row, :, slots] = values[layer, row, :, offsets]
                    if has_sinks:
                        self.sink_keys[layer][row, :, kept[sinks]] = raw_keys[layer, row, :, offsets[sinks]]
                if ring:
                    self.ring_index[row, slots] = kept
                else:
                    self.token_index[row, slots] = kept
                    self.token_ids[row, slots] = token_ids[row, offsets]
        self.seen += steps - torch.tensor(padding, device=self.device)

    def _write_short_chunk(self, keys: torch.Tensor, raw_keys: torch.Tensor, values: torch.Tensor,
                           token_ids: torch.Tensor) -> None:
        """write_chunk for T <= every row's window: the T new tokens land in T distinct slots, so each
        buffer is written by one scatter on the device, with no host sync (a CUDA graph can capture it)."""
        steps = token_ids.shape[1]
        keys, raw_keys, values = keys.to(self.dtype), raw_keys.to(self.dtype), values.to(self.dtype)
        index = self.seen.view(-1, 1) + torch.arange(steps, device=self.device)  # [batch, T]
        slots = self.slot_of(index)
        ring_slots = self.slot_of(index, ring=True) if self.ring_layers else slots
        for layer, producer in enumerate(self.producers):
            where = ring_slots if producer in self.ring_layers else slots
            at = (self._batch_rows.view(-1, 1, 1), self._heads.view(1, -1, 1), where.unsqueeze(1))  # [b, h, T]
            self.keys[layer].index_put_(at, keys[layer])
            self.values[layer].index_put_(at, values[layer])
        if self.sink:
            # Sink s takes the raw key of the chunk's token with index s, where the chunk holds it.
            offset = self._sink_slots.view(1, -1) - self.seen.view(-1, 1)  # [batch, sink]
            holds = (offset >= 0) & (offset < steps) & self.is_sink(self._sink_slots.expand(self.batch_size, -1))
            holds = holds.unsqueeze(1).unsqueeze(-1)
            batch, heads, _, dim = self.sink_keys[0].shape
            pick = offset.clamp(0, steps - 1).view(batch, 1, self.sink, 1).expand(batch, heads, self.sink, dim)
            for layer, sink_keys in enumerate(self.sink_keys):
                sink_keys.copy_(torch.where(holds, raw_keys[layer].gather(2, pick), sink_keys))
        self.token_index.scatter_(1, slots, index)
        self.token_ids.scatter_(1, slots, token_ids)
        if self.ring_layers:
            self.ring_index.scatter_(1, ring_slots, index)
        self.seen += steps

    # ---- state --------------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget everything, keeping the buffers and the row sizes."""
        for name, buffer in self._state():
            buffer.fill_(EMPTY if name in ("token_index", "ring_index") else 0)

    def set_row_size(self, row: int, sink: int, window: int) -> None:
        """Give a row its own sink and window (at most the buffers' shape) and empty it."""
        validate_cache_size(sink, window)
        if sink > self.sink or window > self.window:
            raise ValueError(f"a row of sink {sink} + window {window} does not fit a cache of sink "
                             f"{self.sink} + window {self.window}")
        self.rows(row, row + 1).reset()
        self.row_sink[row] = sink
        self.row_window[row] = window
        self._sizes[self._first + row] = [int(sink), int(window)]

    def snapshot(self, into: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """A copy of the state, to restore later (undo/regenerate) in O(cache size).

        Pass an earlier snapshot as `into` to reuse its buffers instead of allocating new ones.
        """
        if into is None:
            return {name: buffer.clone() for name, buffer in self._state(sizes=True)}
        for name, buffer in self._state(sizes=True):
            into[name].copy_(buffer, non_blocking=True)
        return into

    def restore(self, snapshot: dict[str, torch.Tensor]) -> None:
        """Copy a snapshot back into the existing buffers (no reallocation), row sizes included."""
        for name, buffer in self._state(sizes=True):
            buffer.copy_(snapshot[name], non_blocking=True)
        sinks, windows = snapshot["row_sink"].tolist(), snapshot["row_window"].tolist()
        for row, size in enumerate(zip(sinks, windows)):
            self._sizes[self._first + row] = list(size)

    def row_state(self, row: int, into: dict[str, torch.Tensor] | None = None, pin: bool = False,
                  allocate: Callable[[int], torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """A copy of one row's state on the host (pinned memory with `pin`, for fast copies back),
        packed in one byte block (packed_state.py); `into`: an earlier one whose block is reused
        when it is large enough; `allocate`: where a new block comes from (bytes -> uint8 block;
        default a tensor of its own). Only the slots the row holds are copied (`held`): early in a
        conversation, a small part, and the block is no larger than that."""
        view = self.rows(row, row + 1)
        held = view.held_columns(), view.held_columns(ring=True) if self.ring_layers else 0
        parts = [(name, buffer[view._held_part(name, held)]) for name, buffer in view._state(sizes=True)]
        specs = _packed_specs(parts)
        size = packed_bytes(specs)
        block = into.get(BLOCK) if into is not None else None
        if block is None or block.numel() < size or block.is_pinned() != pin:
            block = allocate(size) if allocate is not None else torch.empty(size, dtype=torch.uint8, pin_memory=pin)
        state = carve(block, specs)
        state["held"].copy_(torch.tensor(held))
        if not self._stages_transfers:
            torch._foreach_copy_([state[name] for name, _ in parts], [part for _, part in parts])
        else:  # gathered on the device, then one copy across ("held", known here, is the first ALIGN bytes)
            staging = self._staging_block(size)
            staged = carve(staging, specs)
            torch._foreach_copy_([staged[name] for name, _ in parts], [part for _, part in parts])
            block[ALIGN:size].copy_(staging[ALIGN:size], non_blocking=True)
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()  # the copy is read on the host next
        state[BLOCK] = block
        return state

    def load_row(self, row: int, state: dict[str, torch.Tensor]) -> None:
        """Put a row state (from `row_state`, any row of a cache of the same shape) into `row`. The
        keys and values of the slots it did not hold are left as they are: their stream index is
        empty, so they are never read."""
        view = self.rows(row, row + 1)
        held = tuple(state["held"].tolist())
        parts = [(name, buffer[view._held_part(name, held)]) for name, buffer in view._state(sizes=True)]
        if not self._stages_transfers:
            sources = [state[name] for name, _ in parts]
        else:  # one copy across into the device's block, then scattered there
            specs = specs_of(state)
            size = packed_bytes(specs)
            staging = self._staging_block(size)
            staging[ALIGN:size].copy_(state[BLOCK][ALIGN:size], non_blocking=True)
            staged = carve(staging, specs)
            sources = [staged[name] for name, _ in parts]
        torch._foreach_copy_([part for _, part in parts], sources, non_blocking=True)
        sink, window = state["row_sink"].tolist()[0], state["row_window"].tolist()[0]
        self._sizes[self._first + row] = [sink, window]

    @property
    def _stages_transfers(self) -> bool:
        """Whether row states cross through the device's byte block (any device but the CPU's own
        memory; `stage_transfers` set on a cache decides for it, as tests do on a CPU)."""
        return self.device.type != "cpu" if self.stage_transfers is None else self.stage_transfers

    def _staging_block(self, size: int) -> torch.Tensor:
        """The device's byte block for packed row states (one per cache; grown on demand). Its uses
        are ordered on the current stream, so one block serves every copy in turn."""
        if not self._staging or self._staging[0].numel() < size:
            whole_row = packed_bytes(_packed_specs(self.rows(0, 1)._state(sizes=True)))
            self._staging[:] = [torch.empty(max(size, whole_row), dtype=torch.uint8, device=self.device)]
        return self._staging[0]

    def _held_part(self, name: str, held: tuple[int, int]) -> tuple[slice, ...]:
        """The part of state buffer `name` to copy, given the held slots (full buffers, ring)."""
        base, _, layer = name.partition(".")
        if base in ("keys", "values"):
            on_ring = self.on_ring(self.producers[int(layer)])
            return (slice(None), slice(None), slice(0, held[1] if on_ring else held[0]))
        return (slice(None),)  # the small buffers whole: the stream indices say which slots hold a token

    def copy_row(self, source: int, target: int) -> None:
        """Row `target` becomes a copy of row `source` (sizes included), on the device, queued behind
        the work already queued: no host sync (the sizes come from the host's own copy), and one
        multi-tensor copy per dtype instead of a launch per buffer (a read through the spare row
        copies a row twice)."""
        if source == target:
            return
        sources = self._row_buffers(source)
        for dtype, targets in self._row_buffers(target).items():
            torch._foreach_copy_(targets, sources[dtype], non_blocking=True)
        self._sizes[self._first + target] = list(self._sizes[self._first + source])

    def _row_buffers(self, row: int) -> dict[torch.dtype, list[torch.Tensor]]:
        """Row `row`'s part of every state buffer (sizes included), grouped by dtype: the fused
        multi-tensor copy takes one dtype at a time. Kept: a row's views never change, and making
        seventy of them costs more than the copy."""
        groups = self._row_views.get(row)
        if groups is None:
            groups = {}
            for _, buffer in self._state(sizes=True):
                groups.setdefault(buffer.dtype, []).append(buffer[row])
            self._row_views[row] = groups
        return groups

    def _state(self, sizes: bool = False) -> list[tuple[str, torch.Tensor]]:
        """Every buffer of the state, named (per-layer buffers as keys.0, keys.1, ...); with `sizes`,
        the row sizes too."""
        named = []
        for name in _STATE + (_SIZES if sizes else ()):
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
    def ring_bytes_per_token(self) -> int:
        """The share of `bytes_per_token` of the producers on the ring (kept for the sliding window only)."""
        return self.bytes_per_token // len(self.producers) * len(self.ring_layers)

    @property
    def dense_bytes_per_token(self) -> int:
        """What one token would cost in a dense Llama cache of the same model (every layer)."""
        return self.bytes_per_token // len(self.producers) * self.num_layers

    def tokens_seen(self, row: int = 0) -> int:
        return int(self.seen[row])

    def tokens_held(self, row: int = 0) -> int:
        return min(self.tokens_seen(row), sum(self.row_size(row)))

    def held_indices(self, row: int = 0) -> list[int]:
        """Stream indices of the tokens held, in stream order."""
        return sorted(i for i in self.token_index[row].tolist() if i != EMPTY)

    @property
    def allocated_bytes(self) -> int:
        """Bytes of every row's buffers."""
        return sum(buffer.numel() * buffer.element_size() for _, buffer in self._state())

    @property
    def row_bytes(self) -> int:
        """Bytes of one row's buffers."""
        return self.allocated_bytes // self.batch_size

    def stats(self, row: int = 0) -> CacheStats:
        seen = self.tokens_seen(row)
        return row_stats(self, row, seen)


def row_stats(cache: SinkWindowCache, row: int, seen: int) -> CacheStats:
    """Stats of `row` given how many tokens it has seen (known on the host: no device read)."""
    sink, window = cache.row_size(row)
    held = min(seen, sink + window)
    ring_held = min(seen, sink + min(window, cache.ring_window)) if cache.ring_layers else 0
    ring_bytes = cache.ring_bytes_per_token
    return CacheStats(
        tokens_held=held,
        tokens_seen=seen,
        allocated_bytes=cache.row_bytes,
        used_bytes=held * (cache.bytes_per_token - ring_bytes) + ring_held * ring_bytes,
        dense_bytes=seen * cache.dense_bytes_per_token,
        kv_layers=len(cache.producers),
        total_layers=cache.num_layers,
        sink=sink,
        window=window,
        sliding_kv_layers=len(cache.ring_layers),
        sliding_tokens_held=ring_held,
    )


def _packed_specs(parts: list[tuple[str, torch.Tensor]]) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    """The layout of a packed row state (packed_state.py) holding these parts of a row's buffers:
    the held slot counts first (known on the host; their block is the first ALIGN bytes), then each part."""
    return [("held", (2,), torch.long)] + [(name, tuple(part.shape), part.dtype) for name, part in parts]


_STATE = ("keys", "values", "sink_keys", "token_index", "ring_index", "token_ids", "seen")
_SIZES = ("row_sink", "row_window")
_PER_ROW = _STATE + _SIZES + ("active",)


def validate_cache_size(sink: int, window: int) -> None:
    """Raise ValueError naming the bad setting."""
    if not isinstance(sink, int) or isinstance(sink, bool) or sink < 0:
        raise ValueError(f"sink must be a whole number >= 0, got {sink!r}")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be a whole number >= 1, got {window!r}")
