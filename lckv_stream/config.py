"""`LCKVLlamaConfig`: the published `lckv-llama` config format (a LlamaConfig plus the layer map)."""

from __future__ import annotations

import json
import os
from pathlib import Path

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

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs) -> "LCKVLlamaConfig":
        """As transformers reads it; the `torch_dtype` that `to_dict` writes beside `dtype` is dropped
        first (it would only bring transformers' deprecation warning)."""
        if "dtype" in config_dict and config_dict.get("torch_dtype") == config_dict["dtype"]:
            config_dict = {k: v for k, v in config_dict.items() if k != "torch_dtype"}
        return super().from_dict(config_dict, **kwargs)

    def to_json_file(self, json_file_path: str | os.PathLike, use_diff: bool = True) -> None:
        """config.json, readable by the official code (a transformers 4 LlamaConfig) as the same model."""
        fields = for_official_readers(json.loads(self.to_json_string(use_diff=use_diff)), Path(json_file_path).parent)
        Path(json_file_path).write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def for_official_readers(fields: dict, folder: Path) -> dict:
    """The saved fields plus what readers of transformers 4 configs look for at the top level:
    transformers 5 keeps `rope_theta` inside `rope_parameters` and writes `dtype`, so the official
    code would read rope_theta 10000 and float32. `auto_map` stays only when the code files it names
    are in `folder` (else `trust_remote_code` would look for missing files). The identity map is left
    out: it is the default everywhere, and transformers' plain LlamaConfig, whose `layer_types` means
    something else, then reads a plain Llama's config."""
    fields = dict(fields)
    rope = dict(fields.get("rope_parameters") or {})
    if "rope_theta" in rope:
        fields["rope_theta"] = rope.pop("rope_theta")
    fields["rope_scaling"] = rope if rope.get("rope_type", "default") != "default" else None
    if fields.get("dtype") is not None:
        fields["torch_dtype"] = fields["dtype"]
    if fields.get("auto_map") and not all((folder / name).is_file() for name in _code_files(fields["auto_map"])):
        del fields["auto_map"]
    if fields.get("layer_types") == identity_map(fields["num_hidden_layers"]):
        del fields["layer_types"]
    return fields


def _code_files(auto_map: dict) -> set[str]:
    """The module files an auto_map names ("modeling_lckv.LCKVLlamaForCausalLM" -> modeling_lckv.py)."""
    references = []
    for value in auto_map.values():
        references.extend(value if isinstance(value, (list, tuple)) else [value])
    return {reference.split("--")[-1].rsplit(".", 1)[0] + ".py" for reference in references if reference}


__all__ = ["LCKVLlamaConfig"]
