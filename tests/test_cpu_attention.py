"""The CPU decode-attention kernel (`torch.ops.lckv.decode_attention`, decode_attention.cpp) against a
plain float64 softmax on random keys and values under every kind of mask a step has, and the model
stepped with it against the same model on torch's attention (the "torch" backend)."""

import threading

import pytest
import torch

from app_support.tiny import tiny_model
from lckv_stream import cla_map, int8_kernel, lckv_map
from lckv_stream.attention import choose_attention_backend
from lckv_stream.engine import Engine, EngineSettings
from lckv_stream.sampling import SamplingSettings

pytestmark = pytest.mark.skipif(not int8_kernel.available(), reason="no CPU kernels here "
                                f"({int8_kernel.unavailable_reason()})")

# Against float64, on these inputs (values ~ N(0, 1), scores up to ~30): torch's own float32
# attention is up to 3e-6 off, the kernel up to 2e-6.
TOLERANCE = 5e-6


def reference(query, keys, values, visible):
    """softmax(q k^T / sqrt(d)) v in float64 over the visible slots; zeros for a row that sees none."""
    scores = query.double() @ keys.double().transpose(-1, -2) / query.shape[-1] ** 0.5
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    return (torch.softmax(scores, -1).nan_to_num(0.0) @ values.double()).float()


def masks(batch: int, slots: int, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """[batch, slots] visibility of each kind a step has, a different one per row where it can be."""
    sink_window = torch.zeros(batch, slots, dtype=torch.bool)
    for row in range(batch):  # row sink, empty slots up to the buffer's sink, the row's window
        sink, window = row % 5, slots - 16 - 7 * row
        sink_window[row, :sink] = True
        sink_window[row, 16 : 16 + window] = True
    sliding = torch.zeros(batch, slots, dtype=torch.bool)
    for row in range(batch):  # the last few slots of a ring, wrapped around its end
        start = (11 * row + 5) % slots
        sliding[row, torch.arange(start, start + 9) % slots] = True
    few = torch.zeros(batch, slots, dtype=torch.bool)
    few[:, 0] = True
    few[-1, :] = False  # a row that sees no key at all
    return {
        "all": torch.ones(batch, slots, dtype=torch.bool),
        "random": torch.rand(batch, slots, generator=generator) < 0.5,
        "sink + window": sink_window,
        "sliding": sliding,
        "one slot or none": few,
    }


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("batch, heads, rows, dim, slots", [
    (1, 3, 3, 64, 1040),  # the default model: 9 query heads on 3 KV heads, sink 16 + window 1,024
    (4, 3, 3, 64, 300),  # splits of 256 slots, the last one short
    (3, 2, 2, 16, 37),  # the tests' tiny models
    (2, 1, 4, 128, 513),
    (2, 2, 1, 32, 9),  # fewer slots than a block
])
def test_the_kernel_matches_a_plain_softmax_under_every_mask(dtype, batch, heads, rows, dim, slots):
    generator = torch.Generator().manual_seed(slots)
    query = torch.randn(batch, heads, rows, dim, generator=generator)
    keys = (3 * torch.randn(batch, heads, slots, dim, generator=generator)).to(dtype)  # peaked softmaxes too
    values = torch.randn(batch, heads, slots, dim, generator=generator).to(dtype)
    for name, visible in masks(batch, slots, generator).items():
        got = torch.ops.lckv.decode_attention(query, keys, values, visible)
        want = reference(query, keys.float(), values.float(), visible)
        assert got.shape == want.shape and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE, msg=name)
        blind = ~visible.any(-1)
        assert (got[blind] == 0).all(), name


def rotate(x, cos, sin):
    """The Llama RoPE of x [batch, heads, n, dim] by cos/sin [batch, n, dim], written out (float32, as
    the cache computes the keys it stores)."""
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x.float() * cos[:, None] + turned.float() * sin[:, None]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("sink, slots, dim, angle_dtype", [
    (16, 300, 64, torch.float32), (4, 40, 64, torch.float32), (20, 600, 64, torch.float32), (16, 16, 64, torch.float32),
    (16, 300, 16, torch.float32),  # half a head under 16 lanes: rotated one element at a time
    (16, 300, 128, torch.bfloat16), (4, 40, 32, torch.bfloat16),  # angles kept in bfloat16
])
def test_sink_keys_rotated_in_the_kernel_replace_the_caches_sink_slots(dtype, sink, slots, dim, angle_dtype):
    """With raw sink keys and their cos/sin, the kernel scores the first `sink` slots against those
    keys rotated (rounded to the cache's dtype as the cache stores keys), whatever the cache's own
    sink slots hold; the other slots are the cache's."""
    generator = torch.Generator().manual_seed(sink + slots + dim)
    batch, heads, rows = 3, 3, 3
    query = torch.randn(batch, heads, rows, dim, generator=generator)
    keys = (3 * torch.randn(batch, heads, slots, dim, generator=generator)).to(dtype)
    values = torch.randn(batch, heads, slots, dim, generator=generator).to(dtype)
    raw = (3 * torch.randn(batch, heads, sink, dim, generator=generator)).to(dtype)
    angles = torch.rand(batch, sink, dim // 2, generator=generator) * 6.28
    cos, sin = (torch.cat((angles, angles), -1).cos().to(angle_dtype),
                torch.cat((angles, angles), -1).sin().to(angle_dtype))
    stale = keys.clone()
    stale[:, :, :sink] = 1000.0  # what the cache's sink slots hold must not matter
    expected_keys = keys.clone()
    expected_keys[:, :, :sink] = rotate(raw.float(), cos.float(), sin.float()).to(dtype)
    for name, visible in masks(batch, slots, generator).items():
        got = torch.ops.lckv.decode_attention(query, stale, values, visible, raw, cos, sin)
        want = reference(query, expected_keys.float(), values.float(), visible)
        torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE, msg=name)


@pytest.mark.parametrize("sink", [0, 16])
def test_views_and_a_bfloat16_query_give_the_contiguous_float32_bits(sink):
    """The kernel reads the query through its strides (the model passes a view of its folded heads)
    and the mask through its row stride, and answers a bfloat16 query in bfloat16: the same bits as
    contiguous float32 inputs, rounded once at the end."""
    generator = torch.Generator().manual_seed(sink)
    batch, heads, rows, dim, slots = 2, 3, 3, 64, 300
    query = torch.randn(batch, rows, heads, dim, generator=generator).to(torch.bfloat16).transpose(1, 2)
    keys = (3 * torch.randn(batch, heads, slots, dim, generator=generator)).to(torch.bfloat16)
    values = torch.randn(batch, heads, slots, dim, generator=generator).to(torch.bfloat16)
    wide = torch.rand(batch, slots + 7, generator=generator) < 0.7
    visible = wide[:, 3:slots + 3]  # rows 307 apart
    sinks = ()
    if sink:
        angles = torch.rand(batch, sink, dim // 2, generator=generator) * 6.28
        sinks = ((3 * torch.randn(batch, heads, sink, dim, generator=generator)).to(torch.bfloat16),
                 torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin())
    assert not query.is_contiguous() and not visible.is_contiguous()
    want = torch.ops.lckv.decode_attention(query.float().contiguous(), keys, values, visible.contiguous(), *sinks)
    got = torch.ops.lckv.decode_attention(query, keys, values, visible, *sinks)
    assert got.dtype == torch.bfloat16 and torch.equal(got, want.to(torch.bfloat16))
    got32 = torch.ops.lckv.decode_attention(query.float(), keys, values, visible, *sinks)
    assert torch.equal(got32, want)


def test_a_row_gets_the_same_bits_in_any_batch_and_with_any_threads():
    """The splits are fixed: a conversation's attention does not depend on who it is batched with."""
    generator = torch.Generator().manual_seed(3)
    query, keys, values = (torch.randn(5, 3, 3, 64, generator=generator), torch.randn(5, 3, 700, 64, generator=generator),
                           torch.randn(5, 3, 700, 64, generator=generator))
    visible = torch.rand(5, 700, generator=generator) < 0.9
    together = torch.ops.lckv.decode_attention(query, keys, values, visible)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for row in range(5):
            alone = torch.ops.lckv.decode_attention(query[row : row + 1], keys[row : row + 1], values[row : row + 1],
                                                    visible[row : row + 1])
            assert torch.equal(alone[0], together[row])
    finally:
        torch.set_num_threads(threads)


def test_the_backend_is_chosen_once_per_cache_and_can_be_turned_off(monkeypatch):
    model = tiny_model(cla_map(4, 2))
    assert choose_attention_backend(model.new_cache(2, 16)) == "cpu"
    assert choose_attention_backend(model.to(torch.float16).new_cache(2, 16)) == "torch"  # not compiled in
    model.float()
    monkeypatch.setenv("LCKV_CPU_ATTENTION", "0")
    assert choose_attention_backend(model.new_cache(2, 16)) == "torch"


def _stepped_logits(model, backend: str, sizes: list[tuple[int, int]], steps: int):
    """Logits of a prompt and `steps` greedy tokens for rows of the given (sink, window) in one
    cache (a buffer of the largest sizes), attention of the one-token steps through `backend`."""
    cache = model.new_cache(max(s for s, _ in sizes), max(w for _, w in sizes), batch_size=len(sizes))
    for row, (sink, window) in enumerate(sizes):
        cache.set_row_size(row, sink, window)
    cache.attention_backend = backend
    prompt = torch.randint(0, model.config.vocab_size, (len(sizes), 6), generator=torch.Generator().manual_seed(2))
    out = []
    with torch.inference_mode():
        logits = model(prompt, cache, logits_to_keep=1).logits[:, -1]
        for _ in range(steps):
            token = logits.argmax(-1, keepdim=True)
            logits = model(token, cache, logits_to_keep=1).logits[:, -1]
            out.append(logits)
    return torch.stack(out)


@pytest.mark.parametrize("layer_types, sliding_window", [
    (cla_map(4, 2), 0),
    (lckv_map(4, 1, 1), 0),  # layers reading the KV of a layer above: the first token sees no key
    ("0_1s_1s_3", 7),  # sliding-window layers, their producer on a shorter ring
    (None, 0),
])
def test_steps_through_the_kernel_match_torch_attention_past_the_cache_bound(layer_types, sliding_window):
    extra = {"sliding_window": sliding_window} if sliding_window else {}
    model = tiny_model(layer_types, **extra)
    sizes = [(2, 20), (0, 12), (4, 9)]  # rows of other sizes in one buffer: other masks per row
    want = _stepped_logits(model, "torch", sizes, 40)
    got = _stepped_logits(model, "cpu", sizes, 40)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_a_bfloat16_model_steps_through_the_kernel_like_through_torch_attention():
    model = tiny_model(cla_map(4, 2)).to(torch.bfloat16)
    want = _stepped_logits(model, "torch", [(2, 20), (4, 9)], 10)
    got = _stepped_logits(model, "cpu", [(2, 20), (4, 9)], 10)
    torch.testing.assert_close(got.float(), want.float(), rtol=0.02, atol=0.02 * want.float().abs().max().item())


def test_the_compiled_step_calls_the_kernel_and_matches_the_eager_one():
    """Traced through the op's fake (as Inductor does; `aot_eager` keeps this test fast)."""
    model = tiny_model(cla_map(4, 2))
    eager_cache, compiled_cache = model.new_cache(2, 30), model.new_cache(2, 30)
    eager_cache.attention_backend = compiled_cache.attention_backend = "cpu"
    compiled = torch.compile(lambda token: model(token, compiled_cache, logits_to_keep=1).logits[:, -1],
                             backend="aot_eager", fullgraph=True)
    prompt = torch.randint(0, 300, (1, 5), generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        model(prompt, eager_cache)
        model(prompt, compiled_cache)
        for step in range(40):
            token = torch.tensor([[step * 7 % 300]])
            torch.testing.assert_close(compiled(token), model(token, eager_cache, logits_to_keep=1).logits[:, -1],
                                       rtol=1e-5, atol=1e-5)


def _engine_replies(model, prompts: list[list[int]]) -> tuple[list[list[int]], set[str]]:
    """Greedy replies of conversations decoded together in one engine (threads start together, so
    their steps are batched), and the attention backends of the engine's decoders."""
    greedy = SamplingSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=30)
    engine = Engine(model, EngineSettings(max_batch=4))
    replies: list = [None] * len(prompts)
    barrier = threading.Barrier(len(prompts))

    def talk(i: int) -> None:
        row = engine.open_row(2, 24, seed=0)  # 26 slots: the ring wraps while it generates
        barrier.wait()
        list(engine.prefill(row, prompts[i], 16, threading.Event()))
        stream, fed = engine.generate(row, greedy, frozenset(), threading.Event())
        for _ in stream:
            pass
        replies[i] = list(fed)
        engine.close_row(row)

    try:
        threads = [threading.Thread(target=talk, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        backends = {decoder.cache.attention_backend for bucket in engine._buckets.values()
                    for decoder in bucket._decoders.values()}
    finally:
        engine.close()
    return replies, backends


def test_the_engine_gives_the_same_greedy_tokens_with_the_kernel_on_and_off(monkeypatch):
    model = tiny_model(cla_map(4, 2))
    prompts = [[5, 9, 33, 70], list(range(40, 80)), [250, 3, 3, 17, 100, 12]]
    on, on_backends = _engine_replies(model, prompts)
    monkeypatch.setenv("LCKV_CPU_ATTENTION", "0")
    off, off_backends = _engine_replies(model, prompts)
    assert on_backends == {"cpu"} and off_backends == {"torch"}
    assert all(len(reply) == 30 for reply in on) and on == off
