"""Converting a Llama checkpoint: a shared KV can start from the mean of its readers' projections."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lckv_stream import LayerMap, cla_map, lckv_map
from lckv_stream.convert import average_shared_kv, convert_llama


@pytest.mark.parametrize("layer_types", [cla_map(4, 2), lckv_map(4)])
def test_a_shared_kv_starts_from_the_mean_of_the_projections_of_the_layers_that_read_it(layer_types):
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                         num_attention_heads=4, num_key_value_heads=2))
    model = convert_llama(llama, layer_types)
    own = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    average_shared_kv(model, llama)
    sources = LayerMap.parse(layer_types).sources
    for source in set(sources):
        readers = [layer for layer, read in enumerate(sources) if read == source]
        for name in ("k_proj", "v_proj"):
            expected = sum(getattr(llama.model.layers[i].self_attn, name).weight for i in readers) / len(readers)
            got = getattr(model.model.layers[source].self_attn, name).weight
            assert torch.allclose(got, expected, atol=1e-6)
            if len(readers) > 1:  # a shared KV moved away from the producer's own projections
                assert not torch.allclose(got, own[f"model.layers.{source}.self_attn.{name}.weight"])
    untouched = {name for name in own if ".k_proj." not in name and ".v_proj." not in name}
    assert all(torch.equal(model.state_dict()[name], own[name]) for name in untouched)
