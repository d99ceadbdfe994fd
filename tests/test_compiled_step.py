"""The decode step as the compiler sees it (on CPU, through `aot_eager`): it takes the compiled-only
attention path (the GPU's; turned on for the CPU here), which must give the same logits and the same
cache as the eager step."""

import pytest
import torch

from app_support.tiny import tiny_model
from lckv_stream import attention, cla_map, lckv_map


@pytest.fixture(autouse=True)
def _split_attention_on_cpu(monkeypatch):
    monkeypatch.setattr(attention, "SPLIT_DECODE_DEVICES", ("cuda", "cpu"))


@pytest.mark.parametrize("layer_types", [lckv_map(4, 1, 1), cla_map(4, 2), None], ids=["lckv", "cla", "llama"])
def test_compiled_decode_step_matches_eager_past_the_cache_bound(layer_types):
    model = tiny_model(layer_types)
    eager_cache, compiled_cache = model.new_cache(2, 70), model.new_cache(2, 70)  # 72 slots: a padded block
    compiled = torch.compile(
        lambda token: model(token, compiled_cache, logits_to_keep=1).logits[:, -1], backend="aot_eager",
        fullgraph=True,
    )
    torch.manual_seed(1)
    with torch.inference_mode():
        prompt = torch.randint(0, 300, (1, 5))
        model(prompt, eager_cache)
        model(prompt, compiled_cache)
        for _ in range(100):  # wraps the ring
            token = torch.randint(0, 300, (1, 1))
            expected = model(token, eager_cache, logits_to_keep=1).logits[:, -1]
            torch.testing.assert_close(compiled(token), expected, rtol=1e-5, atol=1e-5)
    assert compiled_cache.held_indices() == eager_cache.held_indices() == [0, 1] + list(range(35, 105))
    for got, want in zip(compiled_cache.keys + compiled_cache.values, eager_cache.keys + eager_cache.values):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_compiled_decode_of_the_first_token_without_keys_is_finite():
    """A reader of a layer above has nothing to see at the very first token: zeros, not NaN."""
    model = tiny_model(lckv_map(4, 1, 1))
    cache = model.new_cache(0, 8)
    compiled = torch.compile(lambda token: model(token, cache, logits_to_keep=1).logits[:, -1],
                             backend="aot_eager", fullgraph=True)
    with torch.inference_mode():
        reference = model(torch.tensor([[7]]), model.new_cache(0, 8), logits_to_keep=1).logits[:, -1]
        logits = compiled(torch.tensor([[7]]))
    assert torch.isfinite(logits).all()
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)


def test_a_compiled_step_fed_by_a_larger_graph_keeps_its_guards():
    """The engine's whole-step graph feeds the compiled step the tokens it has just drawn, which are
    made in inference mode: passed as they are, the step's guards fail (it would compile again, on
    the serving thread); fed through `feed_step`, they hold, and the logits are the eager step's."""
    from types import SimpleNamespace

    from lckv_stream.decoding import decode_step, feed_step

    model = tiny_model(lckv_map(4, 1, 1))
    step = torch.compile(decode_step, backend="aot_eager", fullgraph=True, dynamic=False)
    scratch, tokens = model.new_cache(4, 60, batch_size=2), torch.zeros(2, 1, dtype=torch.long)
    with torch.inference_mode():  # compiled as the side compiler does: its tokens and cache made outside
        step(model, tokens, scratch)
    cache, reference = model.new_cache(4, 60, batch_size=2), model.new_cache(4, 60, batch_size=2)
    decoder = SimpleNamespace(step_function=step, cache=cache, step_input=torch.zeros(2, 1, dtype=torch.long))
    with torch.inference_mode(), torch.compiler.set_stance("fail_on_recompile"):
        drawn = torch.tensor([5, 6])
        with pytest.raises(RuntimeError, match="recompile"):
            step(model, drawn.view(-1, 1), cache)
        logits = feed_step(model, decoder)(drawn)
        expected = decode_step(model, drawn.view(-1, 1), reference)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def test_prefill_chunks_compiled_once_follow_the_eager_chunks_at_every_length():
    """The side compiler's prefill compile (TorchInductor, the chunk length a symbol): one compiled
    function serves every chunk size the engine captures, with no recompile, on the bucket's spare
    row (where a GPU's captured chunks run) whatever that row's own size, and gives the eager chunk's
    logits and cache. (A map that reads from above iterates its prefill: its compile takes minutes
    even for this tiny model, so the default model's kind of map is the one tested.)"""
    from lckv_stream.buckets import Bucket, Counters, SideCompiler, StepOptions
    from lckv_stream.decoding import PREFILL_GRAPH_SIZES, compile_step, decode_step

    model = tiny_model(cla_map(4, 2))
    buckets = [Bucket(model, 4, 256, rows=2, options=StepOptions(), counters=Counters()) for _ in range(2)]
    # As on a GPU: the fixed-shape steps of two batch sizes compile first (options without
    # guard_filter_fn: the public decode_step's own code).
    for batch in (1, 2):
        with torch.inference_mode():
            compile_step({})(model, torch.zeros(batch, 1, dtype=torch.long), model.new_cache(4, 256, batch_size=batch))
    compiled = SideCompiler()._compile_prefill(buckets[0], 0)
    assert callable(compiled), compiled
    for bucket in buckets:  # a row smaller than the bucket: the compile saw the bucket's own size
        bucket.cache.set_row_size(bucket.spare, 4, 200)
    compiled_row, eager_row = (bucket.cache.rows(bucket.spare, bucket.spare + 1) for bucket in buckets)
    torch.manual_seed(2)
    with torch.inference_mode():
        for size in [*PREFILL_GRAPH_SIZES, 16, 4, 64]:  # the last ones run past the row's window
            if size > 200:
                continue
            ids = torch.randint(0, 300, (1, size))
            with torch.compiler.set_stance("fail_on_recompile"):
                got = compiled(model, ids, compiled_row)
            expected = decode_step(model, ids, eager_row)
            assert (got - expected).abs().max() < 1e-4, size
            assert compiled_row.held_indices(0) == eager_row.held_indices(0)
