"""The `layer_types` grammar: which layer's KV each layer attends to.

One map describes LCKV, CLA, YOCO and plain Llama alike. The i-th entry is the layer whose KV layer i
reads; an `s` suffix marks a sliding-window layer (e.g. ``"0_20_20s_21"``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ENTRY = re.compile(r"^(\d+)(s?)$")


@dataclass(frozen=True)
class LayerMap:
    """Parsed `layer_types`: sources[i] is the layer whose KV layer i reads."""

    sources: tuple[int, ...]
    sliding: tuple[bool, ...]

    @classmethod
    def parse(cls, layer_types: str, num_layers: int | None = None) -> "LayerMap":
        """Parse and validate a `layer_types` string; raise ValueError naming the problem."""
        if not isinstance(layer_types, str) or not layer_types.strip():
            raise ValueError(f"layer_types must be a non-empty string like '0_1_2', got {layer_types!r}")
        sources, sliding = [], []
        for position, entry in enumerate(layer_types.strip().split("_")):
            match = _ENTRY.match(entry)
            if match is None:
                raise ValueError(
                    f"layer_types entry {position} is {entry!r}: expected an integer, optionally followed by 's'"
                )
            sources.append(int(match.group(1)))
            sliding.append(match.group(2) == "s")
        if num_layers is not None and len(sources) != num_layers:
            raise ValueError(
                f"layer_types has {len(sources)} entries but num_hidden_layers is {num_layers}: "
                "give one entry per layer"
            )
        for layer, source in enumerate(sources):
            if source >= len(sources):
                raise ValueError(
                    f"layer_types: layer {layer} reads the KV of layer {source}, but there are only "
                    f"{len(sources)} layers"
                )
        return cls(tuple(sources), tuple(sliding))

    def __len__(self) -> int:
        return len(self.sources)

    def to_string(self) -> str:
        return "_".join(f"{src}{'s' if sl else ''}" for src, sl in zip(self.sources, self.sliding))

    @property
    def producers(self) -> tuple[int, ...]:
        """Layers that compute and cache KV (every layer some layer reads), in ascending order."""
        return tuple(sorted(set(self.sources)))

    @property
    def sliding_only_producers(self) -> tuple[int, ...]:
        """Producers whose every reader is a sliding-window layer: their KV is needed for
        `sliding_window` recent tokens only."""
        return tuple(p for p in self.producers
                     if all(self.sliding[i] for i, source in enumerate(self.sources) if source == p))

    def computes_kv(self, layer: int) -> bool:
        return layer in set(self.sources)

    def attends_above(self, layer: int) -> bool:
        """True when the layer reads a KV made higher up: the current token's KV does not exist yet."""
        return self.sources[layer] > layer

    def iteration_groups(self) -> list[tuple[int, int, bool]]:
        """Split the layers into consecutive groups (start, stop, cyclic).

        A cyclic group holds every layer between one that reads a KV from above and the highest layer
        that its dependency chain reaches; only those layers need iterating in parallel encoding.
        """
        groups: list[tuple[int, int, bool]] = []
        start, n = 0, len(self)
        while start < n:
            if self.attends_above(start):
                stop = self.sources[start]
                while stop < max(self.sources[start : stop + 1]):
                    stop = max(self.sources[start : stop + 1])
                groups.append((start, stop + 1, True))
                start = stop + 1
            else:
                stop = start + 1
                while stop < n and not self.attends_above(stop):
                    stop += 1
                groups.append((start, stop, False))
                start = stop
        return groups


def iteration_plan(forward_passes: int, backward_passes: int) -> tuple[bool, ...]:
    """Whether each iteration of a cyclic group carries gradients, as the official code plans them:
    `forward_passes` (m) iterations without, then `backward_passes` (b) with, m + b in all. Its last
    iteration always carries them, so b = 0 runs like b = 1 (m + 1 iterations)."""
    return (False,) * forward_passes + (True,) * max(backward_passes, 1)


def identity_map(num_layers: int) -> str:
    """Plain Llama: every layer reads its own KV."""
    return "_".join(str(i) for i in range(num_layers))


def lckv_map(num_layers: int, warmup_bottom: int = 1, warmup_top: int = 1) -> str:
    """LCKV: bottom and top warmup layers keep their own KV; the rest read the KV of the highest
    non-top-warmup layer (e.g. 22 layers, 1+1 warmup: ``0_20_20_..._20_21``)."""
    if warmup_bottom < 0 or warmup_top < 0 or warmup_bottom + warmup_top >= num_layers:
        raise ValueError(
            f"warmup layers ({warmup_bottom} bottom + {warmup_top} top) must leave at least one layer "
            f"out of {num_layers}"
        )
    target = num_layers - warmup_top - 1
    entries = [
        i if i < warmup_bottom or i > target else target
        for i in range(num_layers)
    ]
    return "_".join(map(str, entries))


def cla_map(num_layers: int, sharing_factor: int = 2) -> str:
    """CLA: groups of `sharing_factor` adjacent layers read the KV of the group's first layer."""
    if sharing_factor < 1:
        raise ValueError(f"sharing_factor must be at least 1, got {sharing_factor}")
    return "_".join(str(i - i % sharing_factor) for i in range(num_layers))


def yoco_map(num_layers: int) -> str:
    """YOCO-like: the lower half reads layer 0's KV, the upper half reads the middle layer's KV."""
    half = num_layers // 2
    return "_".join(str(0 if i < half else half) for i in range(num_layers))
