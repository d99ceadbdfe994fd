import pytest
import torch

from app_support.tiny import tiny_model
from lckv_stream import SinkWindowCache, cla_map, lckv_map
from reference import streaming_logits

# "0_2s_2s_3": layer 2's KV is read only by sliding-window layers, so it keeps only their window.
MAPS = [None, lckv_map(4), cla_map(4, 2), "1_2s_3_3", "0_2s_2s_3"]


@pytest.fixture(params=["sink-copies", "re-scoring"])
def sink_scoring(request, monkeypatch):
    """A chunk past the window scores its sinks either way on a CPU (the second is the GPU's)."""
    from lckv_stream import attention

    if request.param == "re-scoring":
        monkeypatch.setattr(attention, "SINK_COPY_DEVICES", ())
    return request.param


@pytest.mark.parametrize("layer_types", MAPS)
@pytest.mark.parametrize("sink, window", [(4, 5), (0, 6), (2, 1), (3, 40)])
def test_streaming_matches_the_slow_reference(layer_types, sink, window, sink_scoring):
    model = tiny_model(layer_types, sliding_window=3)
    ids = torch.randint(0, 300, (22,)).tolist()
    expected, expected_held = streaming_logits(model, ids, sink, window)
    with torch.no_grad():
        cache = model.new_cache(sink, window)
        decoded = torch.cat([model(torch.tensor([[t]]), cache).logits[0] for t in ids])
        chunked_cache = model.new_cache(sink, window)
        # chunks long enough to overflow the cache inside one call; enough passes to be exact
        chunked = torch.cat([model(torch.tensor([part]), chunked_cache, forward_passes=22, sequential=False).logits[0]
                             for part in (ids[:3], ids[3:15], ids[15:])])
    assert (decoded - expected).abs().max() < 1e-5
    assert (chunked - expected).abs().max() < 1e-5
    assert cache.held_indices() == expected_held == chunked_cache.held_indices()
    expected_set = list(range(min(sink, len(ids)))) + list(range(max(sink, len(ids) - window), len(ids)))
    assert expected_held == expected_set


@pytest.mark.parametrize("layer_types", MAPS)
def test_chunks_encoded_as_a_captured_call_would_match_the_reference(layer_types, monkeypatch, sink_scoring):
    """A call captured in a CUDA graph re-scores the sink columns whether or not the chunk overflows
    the cache (the check would need the host); that path alone must give the same logits."""
    from lckv_stream import attention

    monkeypatch.setattr(attention, "_capturing", lambda tensor: True)
    model = tiny_model(layer_types, sliding_window=3)
    ids = torch.randint(0, 300, (22,)).tolist()
    expected, expected_held = streaming_logits(model, ids, 4, 5)
    with torch.no_grad():
        cache = model.new_cache(4, 5)
        chunked = torch.cat([model(torch.tensor([part]), cache, forward_passes=22, sequential=False).logits[0]
                             for part in (ids[:2], ids[2:4], ids[4:9], ids[9:12], ids[12:17], ids[17:])])
    assert (chunked - expected).abs().max() < 1e-5
    assert cache.held_indices() == expected_held


@pytest.mark.parametrize("layer_types", MAPS[:3])
def test_a_cache_larger_than_the_text_equals_the_unbounded_forward(layer_types):
    model = tiny_model(layer_types)
    ids = torch.randint(0, 300, (2, 20))
    with torch.no_grad():
        unbounded = model(ids, sequential=True).logits
        cache = model.new_cache(sink=4, window=16, batch_size=2)  # 4 + 16 >= 20
        bounded = torch.cat([model(ids[:, i : i + 1], cache).logits for i in range(20)], dim=1)
    assert (bounded - unbounded).abs().max() < 1e-5


def test_streaming_never_reallocates_and_keeps_its_size():
    model = tiny_model(lckv_map(4))
    cache = model.new_cache(sink=2, window=8)
    pointers = [t.data_ptr() for t in (*cache.keys, *cache.values, cache.token_index)]
    allocated = cache.allocated_bytes
    with torch.no_grad():
        model(torch.randint(0, 300, (1, 30)), cache)
        for _ in range(40):
            model(torch.randint(0, 300, (1, 1)), cache)
    assert [t.data_ptr() for t in (*cache.keys, *cache.values, cache.token_index)] == pointers
    assert cache.allocated_bytes == allocated
    stats = cache.stats()
    assert (stats.tokens_seen, stats.tokens_held) == (70, 10)
    assert stats.used_bytes == 10 * cache.bytes_per_token


def test_byte_accounting_follows_the_kv_formula():
    model = tiny_model(lckv_map(4))  # producers 0, 2, 3 of 4 layers
    cache = model.new_cache(sink=4, window=12)
    per_token = 3 * 2 * 2 * 16 * 4  # producers x (k, v) x kv_heads x head_dim x float32
    assert cache.bytes_per_token == per_token
    assert cache.dense_bytes_per_token == 4 * 2 * 2 * 16 * 4
    with torch.no_grad():
        model(torch.randint(0, 300, (1, 9)), cache)
    stats = cache.stats()
    assert stats.used_bytes == 9 * per_token
    assert stats.dense_bytes == 9 * cache.dense_bytes_per_token
    assert stats.allocated_bytes >= 16 * per_token
    assert (stats.kv_layers, stats.total_layers) == (3, 4)


def test_snapshot_and_restore_bring_back_the_exact_state():
    model = tiny_model(lckv_map(4))
    cache = model.new_cache(sink=2, window=6)
    with torch.no_grad():
        model(torch.randint(0, 300, (1, 5)), cache)
        saved = cache.snapshot()
        expected = model(torch.tensor([[7]]), cache).logits
        model(torch.randint(0, 300, (1, 9)), cache)
        cache.restore(saved)
        again = model(torch.tensor([[7]]), cache).logits
    assert torch.equal(expected, again)


@pytest.mark.parametrize("layer_types", [cla_map(4, 2), "0_2s_2s_3"])  # the second has a ring buffer
def test_a_copied_row_continues_as_its_source_and_leaves_the_others_alone(layer_types):
    """copy_row: the target row gets every buffer and the sizes of the source (it then gives the
    source's next logits), the source and the other rows stay as they were."""
    model = tiny_model(layer_types, sliding_window=3)
    cache = model.new_cache(sink=2, window=6, batch_size=3)
    cache.set_row_size(0, 1, 5)
    with torch.no_grad():
        model(torch.randint(0, 300, (3, 9)), cache)
        before = {name: buffer.clone() for name, buffer in cache._state(sizes=True)}
        cache.copy_row(0, 2)
        for name, buffer in cache._state(sizes=True):
            assert torch.equal(buffer[2], before[name][0]), name
            assert torch.equal(buffer[:2], before[name][:2]), name
        assert cache.row_size(2) == cache.row_size(0) == (1, 5)
        step = model(torch.tensor([[7], [8], [7]]), cache).logits
    assert torch.equal(step[0], step[2])


def test_batched_rows_stream_independently():
    model = tiny_model(lckv_map(4))
    ids = torch.randint(0, 300, (3, 12))
    with torch.no_grad():
        batch_cache = model.new_cache(sink=2, window=5, batch_size=3)
        batched = torch.cat([model(ids[:, i : i + 1], batch_cache).logits for i in range(12)], dim=1)
        for row in range(3):
            single = model.new_cache(sink=2, window=5)
            alone = torch.cat([model(ids[row : row + 1, i : i + 1], single).logits for i in range(12)], dim=1)
            assert (alone[0] - batched[row]).abs().max() < 1e-5


@pytest.mark.parametrize("sink, window, fragment", [(-1, 4, "sink"), (2, 0, "window"), (1.5, 4, "sink")])
def test_bad_sizes_are_named(sink, window, fragment):
    with pytest.raises(ValueError, match=fragment):
        SinkWindowCache((0,), 1, 1, 4, sink, window)


def test_a_kv_read_only_by_sliding_window_layers_keeps_only_the_window():
    model = tiny_model("0_2s_2s_3", sliding_window=3)  # producers 0, 2, 3; layer 2's readers all slide
    cache = model.new_cache(sink=2, window=10)
    assert cache.ring_layers == (2,)
    assert [k.shape[2] for k in cache.keys] == [12, 2 + 3, 12]
    with torch.no_grad():
        model(torch.randint(0, 300, (1, 30)), cache)
        for _ in range(5):
            model(torch.randint(0, 300, (1, 1)), cache)
    stats = cache.stats()
    per_layer = cache.bytes_per_token // 3
    assert (stats.tokens_held, stats.sliding_kv_layers, stats.sliding_tokens_held) == (12, 1, 5)
    assert stats.used_bytes == 12 * 2 * per_layer + 5 * per_layer
    unbounded = tiny_model("0_2_2_3", sliding_window=3).new_cache(sink=2, window=10)  # no sliding: full length
    assert unbounded.ring_layers == () and [k.shape[2] for k in unbounded.keys] == [12, 12, 12]
    # 7 slots fewer of one layer's keys and values, 5 more stream indices (int64)
    assert unbounded.allocated_bytes - cache.allocated_bytes == 7 * per_layer - 5 * 8


@pytest.mark.parametrize("layer_types", [cla_map(4, 2), "0_2s_2s_3"])
def test_a_chunk_reads_only_the_slots_some_row_holds_and_gets_what_reading_all_gives(layer_types, monkeypatch):
    model = tiny_model(layer_types, sliding_window=3)
    prompt, ids = torch.randint(0, 300, (2, 7)), torch.randint(0, 300, (2, 9))
    first = torch.tensor([[1] * 7, [0] * 4 + [1] * 3])  # rows of 7 and 3 tokens (left padding)

    def encode() -> tuple[torch.Tensor, SinkWindowCache]:
        cache = model.new_cache(sink=4, window=64, batch_size=2)
        with torch.no_grad():
            model(prompt, cache, attention_mask=first)
            held = cache.held_columns(), cache.held_columns(ring=True)
            logits = model(ids, cache).logits
        return logits, cache, held

    assert model.new_cache(sink=4, window=64).held_columns() == 4  # nothing held: the sinks' slots
    trimmed, cache, held = encode()
    assert held[0] == 7  # 4 sinks and 3 window slots, well short of 4 + 64
    assert cache.held_columns() == 4 + 12
    if cache.ring_layers:  # the sliding-window layers' ring (4 + 3 slots) is full, then wraps
        assert held[1] == cache.held_columns(ring=True) == 7
    monkeypatch.setattr(SinkWindowCache, "held_columns", lambda self, ring=False: self.ring_capacity if ring else self.capacity)
    full, full_cache, _ = encode()
    assert (trimmed - full).abs().max() < 1e-5
    assert full_cache.held_indices(0) == cache.held_indices(0) and full_cache.held_indices(1) == cache.held_indices(1)
