import json

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from app_support.tiny import tiny_config, tiny_model
from lckv_stream import LCKVLlamaForCausalLM, cla_map, lckv_map
from reference import iterated_logits


def _llama_twin(model: LCKVLlamaForCausalLM) -> LlamaForCausalLM:
    fields = model.config.to_dict()
    for key in ("layer_types", "forward_passes", "backward_passes", "use_sequential", "force_nodiag", "model_type"):
        fields.pop(key, None)
    twin = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    twin.load_state_dict(model.state_dict())
    return twin


def test_identity_map_equals_transformers_llama_for_prefill_and_decode():
    model = tiny_model(num_key_value_heads=2)
    reference = _llama_twin(model)
    ids = torch.randint(0, 300, (2, 24))
    with torch.no_grad():
        expected = reference(ids).logits
        assert (model(ids).logits - expected).abs().max() < 1e-5
        cache = model.new_cache(sink=4, window=64, batch_size=2)
        prefill = model(ids[:, :10], cache).logits
        steps = [model(ids[:, i : i + 1], cache).logits for i in range(10, 24)]
    assert (torch.cat([prefill, *steps], dim=1) - expected).abs().max() < 1e-5


def test_lckv_parallel_iterations_converge_to_sequential():
    model = tiny_model(lckv_map(6), num_layers=6)
    ids = torch.randint(0, 300, (2, 6))
    with torch.no_grad():
        exact = model(ids, sequential=True).logits
        errors = [(model(ids, sequential=False, forward_passes=m, backward_passes=1).logits - exact).abs().max().item()
                  for m in range(0, 6)]
    assert errors[0] > 1e-2, "one pass should differ: the test would not see convergence otherwise"
    assert all(later <= earlier + 1e-6 for earlier, later in zip(errors, errors[1:]))
    assert errors[-1] < 1e-4  # m + b = number of layers (and of tokens here)


def test_lckv_parallel_is_exact_once_iterations_reach_the_length():
    model = tiny_model(lckv_map(4), num_layers=4)
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        exact = model(ids, sequential=True).logits
        assert (model(ids, forward_passes=10, backward_passes=2, sequential=False).logits - exact).abs().max() < 1e-5
        assert (model(ids, forward_passes=1, backward_passes=2).logits - exact).abs().max() > 1e-4


# Maps with their groups of layers in a cyclic dependency, written out by hand.
CYCLIC = [(lckv_map(4), [(1, 3)]), ("1_1_3_3", [(0, 2), (2, 4)]), ("0_3s_3_3", [(1, 4)])]


@pytest.mark.parametrize("layer_types, groups", CYCLIC)
@pytest.mark.parametrize("m, b", [(3, 2), (1, 3), (2, 0)])
def test_iterations_are_the_papers_m_then_b_with_gradients_through_the_last_b(layer_types, groups, m, b):
    """m iterations without gradients, then b with (b = 0 runs one, as the official plan does)."""
    model = tiny_model(layer_types, forward_passes=m, backward_passes=b, sliding_window=5).train()
    ids = torch.randint(0, 300, (12,))  # more than m + b tokens: encoded in parallel
    weights = torch.randn(12, 300)
    (model(ids.unsqueeze(0)).logits[0] * weights).sum().backward()
    ours = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    logits = model(ids.unsqueeze(0)).logits[0].detach()
    model.zero_grad(set_to_none=True)
    expected = iterated_logits(model, ids, groups, m, max(b, 1))
    (expected * weights).sum().backward()
    assert (logits - expected.detach()).abs().max() < 1e-5
    theirs = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    assert ours.keys() == theirs.keys() == {name for name, _ in model.named_parameters()}
    for name in ours:
        scale = theirs[name].abs().max().item() + 1e-6
        assert (ours[name] - theirs[name]).abs().max() / scale < 1e-4, name


@pytest.mark.parametrize("layer_types", [lckv_map(4), "1_1_3_3"])
def test_prompts_of_at_most_m_plus_b_tokens_are_encoded_sequentially(layer_types):
    model = tiny_model(layer_types, forward_passes=2, backward_passes=1)
    with torch.no_grad():
        short = torch.randint(0, 300, (2, 3))
        assert torch.equal(model(short).logits, model(short, sequential=True).logits)
        longer = torch.randint(0, 300, (2, 4))  # m + b + 1: three iterations cannot reach the 4th token
        assert (model(longer).logits - model(longer, sequential=True).logits).abs().max() > 1e-4
        cache = model.new_cache(sink=2, window=16, batch_size=2)
        model(longer, cache)  # with a cache too: the next short chunk goes token by token
        alone = model.new_cache(sink=2, window=16, batch_size=2)
        model(longer, alone)
        assert torch.equal(model(short, cache).logits, model(short, alone, sequential=True).logits)


@pytest.mark.parametrize("layer_types", [lckv_map(4), cla_map(4, 2), "0_0_0_3", "1_2_3_3"])
def test_decode_with_cache_equals_sequential_forward(layer_types):
    model = tiny_model(layer_types)
    ids = torch.randint(0, 300, (2, 16))
    with torch.no_grad():
        exact = model(ids, sequential=True).logits
        cache = model.new_cache(sink=4, window=32, batch_size=2)
        decoded = torch.cat([model(ids[:, i : i + 1], cache).logits for i in range(16)], dim=1)
    assert (decoded - exact).abs().max() < 1e-5


def test_cla_cache_holds_exactly_the_distinct_source_layers():
    model = tiny_model(cla_map(6, 2), num_layers=6)
    cache = model.new_cache(sink=2, window=8)
    assert cache.producers == (0, 2, 4)
    assert len(cache.keys) == 3
    assert [layer.self_attn.computes_kv for layer in model.model.layers] == [True, False, True, False, True, False]
    assert not hasattr(model.model.layers[1].self_attn, "k_proj")
    assert cache.bytes_per_token * 2 == cache.dense_bytes_per_token  # 3 KV layers of 6


def test_force_nodiag_hides_the_first_token_from_every_layer():
    model = tiny_model(force_nodiag=True)
    ids = torch.randint(0, 300, (1, 5))
    with torch.no_grad():
        logits = model(ids).logits
        # With nothing to attend to, the first token is embedding -> MLPs only.
        hidden = model.model.embed_tokens(ids[:, :1])
        for layer in model.model.layers:
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        expected = model.lm_head(model.model.norm(hidden))
    assert (logits[:, :1] - expected).abs().max() < 1e-5


def test_loss_is_next_token_cross_entropy():
    model = tiny_model()
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        out = model(ids, labels=ids)
    expected = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 300), ids[:, 1:].reshape(-1))
    assert torch.allclose(out.loss, expected)


def test_save_and_from_pretrained_round_trip(tmp_path):
    model = tiny_model(lckv_map(4))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, LCKVLlamaForCausalLM)
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


@pytest.mark.parametrize("with_unused_kv", [True, False])
def test_loads_a_folder_in_the_published_format(tmp_path, with_unused_kv):
    """config.json shaped like the official TinyLlama LCKV release (auto_map to remote code included)."""
    layers = 6
    published = {
        "architectures": ["LCKVLlamaForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_lckv.LCKVLlamaConfig",
                     "AutoModelForCausalLM": "modeling_lckv.LCKVLlamaForCausalLM"},
        "model_type": "lckv-llama", "hidden_act": "silu", "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_hidden_layers": layers, "num_key_value_heads": 2,
        "max_position_embeddings": 2048, "rms_norm_eps": 1e-05, "rope_theta": 10000.0, "rope_scaling": None,
        "tie_word_embeddings": False, "vocab_size": 300, "torch_dtype": "float32",
        "layer_types": "0_4_4_4_4_5", "forward_passes": 7, "backward_passes": 2,
        "sliding_window": 4096, "use_sequential": False, "force_nodiag": False,
        "bos_token_id": 1, "eos_token_id": 2,
    }
    (tmp_path / "config.json").write_text(json.dumps(published))
    # Weights from a plain Llama of the same shape: every layer has k/v projections.
    llama = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in published.items() if k not in (
        "architectures", "auto_map", "model_type", "layer_types", "forward_passes", "backward_passes",
        "use_sequential", "force_nodiag")}))
    state = llama.state_dict()
    if not with_unused_kv:
        state = {k: v for k, v in state.items()
                 if not any(f"layers.{i}.self_attn.{p}_proj" in k for i in (1, 2, 3) for p in "kv")}
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "model.safetensors")
    model = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(model, LCKVLlamaForCausalLM)
    assert model.config.layer_map.producers == (0, 4, 5)
    assert torch.equal(model.model.layers[4].self_attn.k_proj.weight, state["model.layers.4.self_attn.k_proj.weight"])
    assert torch.equal(model.model.layers[2].self_attn.q_proj.weight, state["model.layers.2.self_attn.q_proj.weight"])
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(0, 300, (1, 7))).logits).all()


def test_padding_other_than_left_padding_is_refused_with_a_message():
    model = tiny_model()
    with pytest.raises(ValueError, match="only left padding"):
        model(torch.ones(1, 3, dtype=torch.long), attention_mask=torch.tensor([[1, 1, 0]]))


def test_tiny_config_helper_builds_valid_configs():
    assert tiny_config("0_1_2_3").layer_map.producers == (0, 1, 2, 3)
