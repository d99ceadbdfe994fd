import json

import pytest
from transformers import AutoConfig

from lckv_stream import LCKVLlamaConfig


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
