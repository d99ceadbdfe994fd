"""lckv-stream: Layer-Condensed KV cache models with an attention-sink + sliding-window cache."""

from .cache import CacheStats, SinkWindowCache
from .config import LCKVLlamaConfig
from .generation import StreamingCache
from .layer_map import LayerMap, cla_map, identity_map, lckv_map, yoco_map
from .modeling import LCKVLlamaForCausalLM, LCKVLlamaModel, register_auto_classes

register_auto_classes()

__all__ = [
    "CacheStats",
    "LCKVLlamaConfig",
    "LCKVLlamaForCausalLM",
    "LCKVLlamaModel",
    "LayerMap",
    "SinkWindowCache",
    "StreamingCache",
    "cla_map",
    "identity_map",
    "lckv_map",
    "yoco_map",
]
