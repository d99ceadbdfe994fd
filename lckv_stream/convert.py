"""Build an LCKV model from a Llama checkpoint: same weights, a new layer map."""

from __future__ import annotations

from collections import defaultdict

import torch

from .config import LCKVLlamaConfig
from .modeling import LCKVLlamaForCausalLM

_NOT_LLAMA_FIELDS = ("model_type", "architectures", "transformers_version", "auto_map", "_name_or_path")


def lckv_config_from_llama(llama_config, layer_types: str, **overrides) -> LCKVLlamaConfig:
    """An LCKVLlamaConfig with every architectural field of `llama_config` and the given layer map."""
    fields = {k: v for k, v in llama_config.to_dict().items() if k not in _NOT_LLAMA_FIELDS}
    fields.pop("layer_types", None)  # the Llama attention-kind list, not the LCKV map
    fields.update(layer_types=layer_types, **overrides)
    return LCKVLlamaConfig(**fields)


@torch.no_grad()
def convert_llama(llama, layer_types: str, **overrides) -> LCKVLlamaForCausalLM:
    """Copy every weight of a Llama causal LM into an LCKV model with `layer_types`.

    Layers that read another layer's KV have no k/v projections: theirs are dropped.
    """
    config = lckv_config_from_llama(llama.config, layer_types, **overrides)
    model = LCKVLlamaForCausalLM(config).to(dtype=llama.dtype, device=llama.device)
    wanted = model.state_dict()
    state = {name: tensor for name, tensor in llama.state_dict().items() if name in wanted}
    missing = set(wanted) - set(state)
    if missing:
        raise ValueError(f"the Llama checkpoint lacks weights the LCKV model needs: {sorted(missing)[:5]}")
    model.load_state_dict(state)
    return model.eval()


@torch.no_grad()
def average_shared_kv(model: LCKVLlamaForCausalLM, llama) -> None:
    """Give each layer that computes a KV the mean of the k and v projections of every layer that
    reads that KV (itself included) in the Llama checkpoint it came from, as the official LCKV
    conversion does: a shared KV then starts from what all its readers had, not from one of them."""
    readers: dict[int, list[int]] = defaultdict(list)
    for layer, source in enumerate(model.config.layer_map.sources):
        readers[source].append(layer)
    for source, layers in readers.items():
        attention = model.model.layers[source].self_attn
        for name in ("k_proj", "v_proj"):
            weights = [getattr(llama.model.layers[i].self_attn, name).weight.float() for i in layers]
            target = getattr(attention, name).weight
            target.copy_(torch.stack(weights).mean(0).to(target.dtype))
