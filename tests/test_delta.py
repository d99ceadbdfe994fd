import json

import pytest
import torch

from app_support.tiny import tiny_model
from lckv_stream import cla_map, lckv_map
from lckv_stream.delta import DeltaError, apply_delta, read_delta, save_delta

BASE = {"name": "base.gguf", "sha256": "ab" * 32}


def _delta(model, seed=1):
    generator = torch.Generator().manual_seed(seed)
    q = model.model.layers[1].self_attn.q_proj.weight
    gate = model.model.layers[2].mlp.gate_proj.weight
    return {
        "model.layers.1.self_attn.q_proj.weight": torch.randn(q.shape, generator=generator),
        "model.layers.2.mlp.gate_proj.weight.lora_A": torch.randn(4, gate.shape[1], generator=generator),
        "model.layers.2.mlp.gate_proj.weight.lora_B": torch.randn(gate.shape[0], 4, generator=generator),
    }


def test_round_trip_replaces_and_merges(tmp_path):
    model = tiny_model(lckv_map(4))
    tensors = _delta(model)
    gate_before = model.model.layers[2].mlp.gate_proj.weight.clone()
    save_delta(tmp_path, model.config, tensors, BASE, lora={"rank": 4, "alpha": 8.0}, shard_bytes=4096)
    assert len(list(tmp_path.glob("delta-*.safetensors"))) >= 2  # sharded
    changed = apply_delta(model, tmp_path, expected_base_sha256=BASE["sha256"])
    assert changed == 2
    assert torch.equal(model.model.layers[1].self_attn.q_proj.weight, tensors["model.layers.1.self_attn.q_proj.weight"])
    lora = tensors["model.layers.2.mlp.gate_proj.weight.lora_B"] @ tensors["model.layers.2.mlp.gate_proj.weight.lora_A"]
    assert torch.allclose(model.model.layers[2].mlp.gate_proj.weight, gate_before + 2.0 * lora, atol=1e-5)


def test_a_corrupt_shard_is_refused(tmp_path):
    model = tiny_model(lckv_map(4))
    paths = save_delta(tmp_path, model.config, _delta(model), BASE, lora={"rank": 4, "alpha": 4.0})
    data = bytearray(paths[0].read_bytes())
    data[len(data) // 2] ^= 0xFF
    paths[0].write_bytes(bytes(data))
    with pytest.raises(DeltaError, match="corrupt"):
        apply_delta(model, tmp_path)


def test_a_truncated_shard_with_a_fixed_checksum_still_fails_clearly(tmp_path):
    model = tiny_model(lckv_map(4))
    paths = save_delta(tmp_path, model.config, _delta(model), BASE, lora={"rank": 4, "alpha": 4.0})
    paths[0].write_bytes(paths[0].read_bytes()[:100])
    manifest = json.loads((tmp_path / "delta.json").read_text())
    from lckv_stream.base_model import sha256_of
    manifest["files"][paths[0].name] = sha256_of(paths[0])
    (tmp_path / "delta.json").write_text(json.dumps(manifest))
    with pytest.raises(DeltaError, match="cannot be read"):
        read_delta(tmp_path)


def test_a_delta_for_another_base_is_refused(tmp_path):
    model = tiny_model(lckv_map(4))
    save_delta(tmp_path, model.config, _delta(model), BASE)
    with pytest.raises(DeltaError, match="different base model"):
        apply_delta(model, tmp_path, expected_base_sha256="cd" * 32)


def test_a_delta_for_another_layer_map_is_refused(tmp_path):
    trained = tiny_model(lckv_map(4))
    tensors = {"model.layers.1.self_attn.k_proj.weight": torch.zeros(32, 64)}  # layer 1 makes KV under CLA
    other = tiny_model(cla_map(4, 2))
    assert not hasattr(other.model.layers[1].self_attn, "k_proj")
    save_delta(tmp_path, trained.config, tensors, BASE)
    with pytest.raises(DeltaError, match="does not have"):
        apply_delta(other, tmp_path)


def test_a_shape_mismatch_is_named(tmp_path):
    model = tiny_model(lckv_map(4))
    save_delta(tmp_path, model.config, {"model.layers.1.self_attn.q_proj.weight": torch.zeros(3, 3)}, BASE)
    with pytest.raises(DeltaError, match="shape"):
        apply_delta(model, tmp_path)


def test_a_folder_without_manifest_is_named(tmp_path):
    with pytest.raises(DeltaError, match="delta.json is missing"):
        apply_delta(tiny_model(), tmp_path)


def test_the_default_layer_map_is_the_shipped_config_and_a_missing_folder_says_so(tmp_path):
    from lckv_stream.default_model import DEFAULT_DELTA, default_layer_types
    from lckv_stream.layer_map import LayerMap

    shipped = json.loads((DEFAULT_DELTA / "config.json").read_text())["layer_types"]
    assert default_layer_types() == shipped
    assert len(LayerMap.parse(shipped, 30).producers) == 21
    with pytest.raises(FileNotFoundError, match="default model's folder is incomplete"):
        default_layer_types(tmp_path)
