"""lckv-stream: Layer-Condensed KV cache models with an attention-sink + sliding-window cache.

Importing the package loads nothing heavy, so `python -m lckv_stream` checks its arguments before
torch and transformers load (seconds). The first public name asked for loads them all and registers
the model classes with transformers' Auto classes.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "CacheStats": "cache",
    "SinkWindowCache": "cache",
    "LCKVLlamaConfig": "config",
    "LayerMap": "layer_map",
    "cla_map": "layer_map",
    "identity_map": "layer_map",
    "lckv_map": "layer_map",
    "yoco_map": "layer_map",
    "LCKVLlamaForCausalLM": "modeling",
    "LCKVLlamaModel": "modeling",
    "StreamingCache": "generation",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    for export, module in _EXPORTS.items():
        globals()[export] = getattr(importlib.import_module(f".{module}", __name__), export)
    from .modeling import register_auto_classes

    register_auto_classes()
    return globals()[name]


if TYPE_CHECKING:
    from .cache import CacheStats, SinkWindowCache
    from .config import LCKVLlamaConfig
    from .generation import StreamingCache
    from .layer_map import LayerMap, cla_map, identity_map, lckv_map, yoco_map
    from .modeling import LCKVLlamaForCausalLM, LCKVLlamaModel
