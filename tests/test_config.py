import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from app_support.tiny import tiny_model
from lckv_stream import LCKVLlamaConfig, LCKVLlamaForCausalLM


def test_defaults_match_the_published_format():
    config = LCKVLlamaConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=2)
    assert config.model_type == "lckv-llama"
    assert config.layer_types == "0_1_2"
    assert (config.forward_passes, config.backward_passes) == (7, 2)
    assert config.sliding_window == 4096
    assert config.use_sequential is False and config.force_nodiag is False


def test_save_and_load_through_autoconfig(tmp_path):
    config = LCKVLlamaConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=2, layer_types="0_3s_3_3")
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["layer_types"] == "0_3s_3_3" and saved["model_type"] == "lckv-llama"
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LCKVLlamaConfig)
    assert loaded.layer_types == "0_3s_3_3"
    assert loaded.layer_map.sliding == (False, True, False, False)


def test_mismatched_layer_types_is_a_clear_error():
    with pytest.raises(Exception, match="layer_types has 2 entries but num_hidden_layers is 3"):
        LCKVLlamaConfig(num_hidden_layers=3, hidden_size=32, num_attention_heads=2, layer_types="0_1")


def test_counts_the_official_config_accepts_are_accepted():
    for m, b in [(0, 0), (0, 3), (1, 5), (7, 2)]:  # b > m and b = 0 mean something in the official code
        config = LCKVLlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, forward_passes=m,
                                 backward_passes=b)
        assert (config.forward_passes, config.backward_passes) == (m, b)


@pytest.mark.parametrize("field, value, fragment", [
    ("forward_passes", -1, "forward_passes"),
    ("backward_passes", -2, "backward_passes"),
    ("sliding_window", 0, "sliding_window"),
])
def test_out_of_range_fields_are_named(field, value, fragment):
    with pytest.raises(Exception, match=fragment):
        LCKVLlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, **{field: value})


FIXTURES = Path(__file__).resolve().parent / "fixtures"
PUBLISHED = sorted(FIXTURES.glob("tinyllama-*"))
LCKV_FIELDS = {"layer_types": None, "forward_passes": 7, "backward_passes": 2, "sliding_window": 4096,
               "use_sequential": False, "force_nodiag": False}


def official_reader(fields: dict) -> dict:
    """What the official code's LCKVLlamaConfig (a transformers 4.45 LlamaConfig) takes from a
    config.json: top-level fields only, with that version's defaults."""
    defaults = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
                "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
                "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
                "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False, "mlp_bias": False,
                "head_dim": None, "torch_dtype": None, **LCKV_FIELDS}
    read = {name: fields.get(name, default) for name, default in defaults.items()}
    read["num_key_value_heads"] = read["num_key_value_heads"] or read["num_attention_heads"]
    read["head_dim"] = read["head_dim"] or read["hidden_size"] // read["num_attention_heads"]
    read["layer_types"] = read["layer_types"] or "_".join(map(str, range(read["num_hidden_layers"])))
    return read


def test_a_saved_config_reads_the_same_through_a_top_level_reader(tmp_path):
    config = LCKVLlamaConfig(num_hidden_layers=4, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                             layer_types="0_3_3s_3", forward_passes=3, backward_passes=1, sliding_window=16,
                             force_nodiag=True, rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
                             dtype="bfloat16", max_position_embeddings=8192)
    config.save_pretrained(tmp_path)
    read = official_reader(json.loads((tmp_path / "config.json").read_text()))
    assert read["rope_theta"] == 100000.0 and read["rope_scaling"] is None and read["torch_dtype"] == "bfloat16"
    for name in read:
        if name not in ("rope_theta", "rope_scaling", "torch_dtype"):
            assert read[name] == getattr(config, name), name
    reloaded = AutoConfig.from_pretrained(tmp_path).to_dict()
    assert {**reloaded, "_name_or_path": ""} == {**config.to_dict(), "_name_or_path": ""}


def test_rope_scaling_is_written_the_way_transformers_4_reads_it(tmp_path):
    rope = {"rope_type": "linear", "rope_theta": 500000.0, "factor": 4.0}
    LCKVLlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, rope_parameters=rope).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["rope_theta"] == 500000.0 and saved["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    assert AutoConfig.from_pretrained(tmp_path).rope_parameters == rope


def test_an_identity_map_config_is_read_by_transformers_plain_llama_config(tmp_path):
    model = tiny_model(rope_parameters={"rope_type": "default", "rope_theta": 100000.0})
    model.save_pretrained(tmp_path)
    llama_config = LlamaConfig.from_pretrained(tmp_path)
    assert llama_config.rope_parameters["rope_theta"] == 100000.0
    llama = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(0, 300, (1, 12))
    with torch.no_grad():
        assert (llama(ids).logits - model(ids).logits).abs().max() < 1e-5


@pytest.mark.parametrize("folder", PUBLISHED, ids=lambda path: path.name)
def test_published_configs_load_keep_every_field_and_build_without_remote_code(folder, tmp_path):
    published = json.loads((folder / "config.json").read_text())
    config = AutoConfig.from_pretrained(folder)  # auto_map names remote code: ours is used instead
    assert isinstance(config, LCKVLlamaConfig) and config.force_nodiag is True
    renamed = {"rope_theta": config.rope_parameters["rope_theta"], "torch_dtype": str(config.dtype).removeprefix("torch.")}
    for name, value in published.items():
        if name not in ("_name_or_path", "transformers_version", "rope_scaling"):
            assert renamed.get(name, getattr(config, name, "missing")) == value, name
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert isinstance(model, LCKVLlamaForCausalLM)
    producers = config.layer_map.producers
    assert [layer.self_attn.computes_kv for layer in model.model.layers] == [i in producers for i in range(22)]
    kv_weights = 2 * len(producers) * 2048 * 4 * 64
    dense = 22 * (2 * 2048 * 2048 + 3 * 2048 * 5632 + 2 * 2048) + 2 * 32000 * 2048 + 2048
    assert sum(p.numel() for p in model.parameters()) == dense + kv_weights

    config.save_pretrained(tmp_path / "plain")
    saved = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert "auto_map" not in saved  # no code files beside it
    for name, value in published.items():
        if name not in ("_name_or_path", "transformers_version", "auto_map"):
            assert saved[name] == value, name
    (tmp_path / "with_code").mkdir()
    for name in ("configuration_lckv.py", "modeling_lckv.py"):
        (tmp_path / "with_code" / name).write_text("# the official code\n")
    config.save_pretrained(tmp_path / "with_code")
    assert json.loads((tmp_path / "with_code" / "config.json").read_text())["auto_map"] == published["auto_map"]
