import pytest

from lckv_stream.layer_map import LayerMap, cla_map, identity_map, lckv_map, yoco_map


def test_design_note_examples_for_a_22_layer_tinyllama():
    assert lckv_map(22) == "0_" + "_".join(["20"] * 20) + "_21"
    assert cla_map(22, 2) == "0_0_2_2_4_4_6_6_8_8_10_10_12_12_14_14_16_16_18_18_20_20"
    assert yoco_map(22) == "_".join(["0"] * 11 + ["11"] * 11)
    assert identity_map(3) == "0_1_2"


def test_parse_with_sliding_suffix_and_round_trip():
    parsed = LayerMap.parse("1_2s_0")
    assert parsed.sources == (1, 2, 0)
    assert parsed.sliding == (False, True, False)
    assert parsed.to_string() == "1_2s_0"
    assert parsed.producers == (0, 1, 2)
    assert [parsed.attends_above(i) for i in range(3)] == [True, True, False]


def test_lckv_producers_are_the_three_kv_layers():
    parsed = LayerMap.parse(lckv_map(22))
    assert parsed.producers == (0, 20, 21)
    assert not parsed.computes_kv(5)
    assert parsed.iteration_groups() == [(0, 1, False), (1, 21, True), (21, 22, False)]


def test_cla_and_identity_need_no_iteration():
    assert LayerMap.parse(cla_map(6, 3)).iteration_groups() == [(0, 6, False)]
    assert LayerMap.parse(identity_map(4)).iteration_groups() == [(0, 4, False)]


def test_cyclic_group_closes_over_chained_dependencies():
    # layer 1 reads 3, layer 2 reads 5: the group must reach layer 5
    assert LayerMap.parse("0_3_5_3_4_5_6").iteration_groups() == [(0, 1, False), (1, 6, True), (6, 7, False)]


@pytest.mark.parametrize(
    "text, layers, fragment",
    [
        ("", 2, "non-empty"),
        ("0_x", 2, "entry 1"),
        ("0_1t", 2, "entry 1"),
        ("0_1", 3, "2 entries but num_hidden_layers is 3"),
        ("0_5", 2, "reads the KV of layer 5"),
    ],
)
def test_bad_layer_types_are_named(text, layers, fragment):
    with pytest.raises(ValueError, match=fragment):
        LayerMap.parse(text, layers)


def test_lckv_map_rejects_too_many_warmup_layers():
    with pytest.raises(ValueError, match="warmup"):
        lckv_map(4, 2, 2)
