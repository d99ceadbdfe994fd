"""transformers generation over the sink + window cache: a `Cache` that `generate` can carry.

`StreamingCache(sink, window)` is what a user passes to `model.generate(..., cache=...)` (older
transformers 5 releases: `past_key_values=`): the StreamingLLM cache, allocated once on first use
for the batch it meets, so generation runs past the trained context at constant memory. Without one,
`generate` gets a `StreamingCache(0, max_length)`: every token held, exact, allocated once.

The model keeps its own cache format (`SinkWindowCache`, only the KV-producing layers); this class
only answers what `generate` asks a cache: how many positions it has consumed, and how to reorder
its rows for beam search.
"""

from __future__ import annotations

import inspect

import torch
from transformers import GenerationMixin
from transformers.cache_utils import Cache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .cache import SinkWindowCache, validate_cache_size

# transformers renamed `past_key_values` to `cache` during the 5.x series: speak the running one's names.
CACHE_ARGUMENT = (
    "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters
    else "past_key_values"
)
OUTPUT_CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


class StreamingCache(Cache):
    """A transformers `Cache` holding a `SinkWindowCache` of `sink` first tokens + `window` recent ones.

    `sink=0, window=n` holds n tokens exactly (a static cache). Left padding is never stored: each
    row holds its own tokens, at the positions it would have alone.
    """

    def __init__(self, sink: int = 4, window: int = 1020) -> None:
        validate_cache_size(sink, window)
        super().__init__(layers=[])
        self.sink, self.window = sink, window
        self.cache: SinkWindowCache | None = None
        self.positions = 0  # input positions consumed, padding included: what `generate` counts

    def __repr__(self) -> str:
        return f"StreamingCache(sink={self.sink}, window={self.window}, positions={self.positions})"

    def bind(self, model, batch_size: int) -> SinkWindowCache:
        """The `SinkWindowCache` for `model`, allocated on the first call for this batch size."""
        if self.cache is None:
            self.cache = model.new_cache(self.sink, self.window, batch_size)
        elif self.cache.batch_size != batch_size:
            raise ValueError(f"this cache holds {self.cache.batch_size} rows, the input has {batch_size}")
        return self.cache

    # ---- what generate asks ---------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.positions

    def get_max_length(self, layer_idx: int | None = None) -> int:
        return -1  # no bound on the length: old tokens are evicted

    @property
    def is_compileable(self) -> bool:
        return False  # generate would build 4D masks for a compiled call; the model makes its own

    @property
    def is_croppable(self) -> bool:
        return False

    @property
    def is_linear(self) -> list[bool]:
        return [False]

    @property
    def is_sliding(self) -> list[bool]:
        return [False]

    @property
    def is_dummy(self) -> list[bool]:
        return [False]

    @property
    def batch_size(self) -> int:
        return -1 if self.cache is None else self.cache.batch_size

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row i becomes a copy of row beam_idx[i]."""
        if self.cache is not None:
            self.cache = self.cache.gathered(beam_idx.to(self.cache.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.cache is not None:
            rows = torch.arange(self.cache.batch_size, device=self.cache.device)
            self.cache = self.cache.gathered(rows.repeat_interleave(repeats))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache = self.cache.gathered(indices.to(self.cache.device))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("a sink + window cache cannot take tokens back (assisted decoding needs that)")

    def reset(self) -> None:
        if self.cache is not None:
            self.cache.reset()
        self.positions = 0

    def activate_past_recording(self) -> None:
        raise NotImplementedError("a sink + window cache cannot take tokens back (assisted decoding needs that)")


class LCKVGenerationMixin(GenerationMixin):
    """`generate` with a `StreamingCache` by default (transformers' DynamicCache cannot hold this model's
    condensed KV)."""

    def _prepare_cache_for_generation(self, generation_config, model_kwargs: dict, generation_mode, batch_size: int,
                                      max_cache_length: int, *args, **kwargs) -> None:
        given = model_kwargs.get(CACHE_ARGUMENT)
        if given is not None:
            if isinstance(given, SinkWindowCache):
                raise TypeError("pass a StreamingCache to generate (a SinkWindowCache is the engine's)")
            if not isinstance(given, StreamingCache):
                raise TypeError(f"this model generates with a StreamingCache, not a {type(given).__name__}")
            given._is_user_defined = True
            return
        if generation_config.use_cache is False:
            return
        if generation_config.cache_implementation not in (None, "dynamic", "static"):
            raise ValueError(f"cache_implementation {generation_config.cache_implementation!r} does not apply to "
                             "this model: pass a StreamingCache instead")
        model_kwargs[CACHE_ARGUMENT] = StreamingCache(sink=0, window=max(1, max_cache_length))
