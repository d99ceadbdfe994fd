"""`LCKVLlamaConfig`: the published `lckv-llama` config format (a LlamaConfig plus the layer map)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlamaConfig

from .layer_map import LayerMap, identity_map


@strict
class LCKVLlamaConfig(LlamaConfig):
    """Llama config with the LCKV fields of the official `lckv-llama` format.

    layer_types: underscore-separated ints, the i-th is the layer whose KV layer i reads; an `s` suffix
        marks a sliding-window layer. Defaults to the identity map (plain Llama).
    forward_passes: m, iterations without gradients of the parallel forward (training and prompt
        encoding) over each group of layers with a cyclic dependency.
    backward_passes: b, iterations with gradients that follow them (m + b in all; b = 0 runs as 1).
    sliding_window: window of the layers marked `s`.
    use_sequential: encode token by token (exact, slow). Prompts of at most m + b tokens are encoded
        so anyway when the map reads from above (the parallel iteration would not converge).
    force_nodiag: never attend to the diagonal in any layer.
    """

    model_type = "lckv-llama"

    layer_types: str | None = None
    forward_passes: int = 7
    backward_passes: int = 2
    sliding_window: int = 4096
    use_sequential: bool = False
    force_nodiag: bool = False

    def __post_init__(self, **kwargs):
        # The base class treats `layer_types` as a list of attention-kind names; ours is the LCKV string,
        # so keep it out of the base class's remapping and restore it afterwards.
        layer_types = self.layer_types
        self.layer_types = None
        super().__post_init__(**kwargs)
        if layer_types is None and self.num_hidden_layers is not None:
            layer_types = identity_map(self.num_hidden_layers)
        self.layer_types = layer_types

    def validate_layer_type(self):
        """Part of `@strict` validation: the layer map must parse and match num_hidden_layers."""
        LayerMap.parse(self.layer_types, self.num_hidden_layers)
        # The official config accepts any counts; negative ones have no meaning (they would run as 0).
        for name in ("forward_passes", "backward_passes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if self.sliding_window < 1:
            raise ValueError(f"sliding_window must be at least 1, got {self.sliding_window}")

    @property
    def layer_map(self) -> LayerMap:
        return LayerMap.parse(self.layer_types, self.num_hidden_layers)


__all__ = ["LCKVLlamaConfig"]
