"""Fused q/k/v and gate/up weights give the same model, and stay tied to the layers' own weights."""

import copy

import pytest
import torch

from app_support.tiny import tiny_model
from lckv_stream import cla_map, lckv_map
from lckv_stream.fusion import fuse_projections


def _encode_then_decode(model, prompt, steps):
    """Logits of a parallel encoding, then of cached decoding past the cache bound."""
    outputs = [model(prompt).logits]
    cache = model.new_cache(2, 20, batch_size=prompt.shape[0])
    model(prompt, cache)
    token = prompt[:, -1:]
    for _ in range(steps):
        logits = model(token, cache, logits_to_keep=1).logits[:, -1]
        outputs.append(logits)
        token = logits.argmax(-1, keepdim=True)
    return outputs


@pytest.mark.parametrize("layer_types", [cla_map(4, 2), lckv_map(4, 1, 1), None], ids=["cla", "lckv", "llama"])
def test_fused_model_gives_the_same_logits(layer_types):
    model = tiny_model(layer_types)
    fused = copy.deepcopy(model)
    producers = len(model.config.layer_map.producers)
    assert fuse_projections(fused) == producers + model.config.num_hidden_layers
    prompt = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        for got, want in zip(_encode_then_decode(fused, prompt, 30), _encode_then_decode(model, prompt, 30)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_compiled_step_uses_the_fused_weights_alike():
    model = tiny_model(cla_map(4, 2))
    fuse_projections(model)
    eager_cache, compiled_cache = model.new_cache(2, 30), model.new_cache(2, 30)
    compiled = torch.compile(lambda token: model(token, compiled_cache, logits_to_keep=1).logits[:, -1],
                             backend="aot_eager", fullgraph=True)
    with torch.inference_mode():
        for _ in range(40):
            token = torch.randint(0, 300, (1, 1))
            expected = model(token, eager_cache, logits_to_keep=1).logits[:, -1]
            torch.testing.assert_close(compiled(token), expected, rtol=1e-5, atol=1e-5)


def test_editing_a_layer_weight_in_place_reaches_the_fused_matrix():
    """Loading a delta after fusing (in-place copies) must change what the fused path computes."""
    model = tiny_model(cla_map(4, 2))
    reference = copy.deepcopy(model)
    fuse_projections(model)
    with torch.no_grad():
        for net in (model, reference):
            net.model.layers[0].self_attn.k_proj.weight.mul_(3.0)
            net.model.layers[1].mlp.up_proj.weight.add_(0.5)
    prompt = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        torch.testing.assert_close(model(prompt).logits, reference(prompt).logits, rtol=1e-5, atol=1e-5)


def test_layers_with_biases_or_adapters_are_left_alone():
    model = tiny_model(cla_map(4, 2), attention_bias=True)
    assert fuse_projections(model) == 4  # the MLPs only
    assert all(layer.self_attn.qkv_weight is None for layer in model.model.layers)
