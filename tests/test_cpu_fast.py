"""The CPU fast path as the engine runs it: chosen by default on a CPU and turned off by
LCKV_CPU_FAST=0, one quantized copy per model (the float model untouched), named in the panel, the
same greedy tokens as the float model on a fixed prompt set (within the agreement stated below), and
batched rows like each row alone. Compiling is tested apart (LCKV_COMPILE_TESTS=1): it takes a
minute on two cores."""

import os
import threading
import time

import pytest
import torch

from app_support.tiny import tiny_model
from lckv_stream import cla_map
from lckv_stream.chat import CacheSettings, ChatSession, TurnEnd
from lckv_stream.attention import choose_attention_backend
from lckv_stream.cpu_fast import CPU_CACHE_DTYPE, CompiledCPUDecoder, cpu_fast_model, fast_path_name
from lckv_stream.engine import Engine, EngineSettings
from lckv_stream.sampling import RowSampling, SamplingSettings, sample_rows, width_of

GREEDY = SamplingSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=16)
PROMPTS = ["Hello!", "What is the capital of France?", "Tell me about streaming models.", "The quick brown fox",
           "Layer-condensed caches", "How are you today?", "user assistant", "Paris."]


def _model(vocab: int = 320):
    return tiny_model(cla_map(4, 2), hidden_size=128, intermediate_size=256, vocab_size=vocab)


def test_the_device_defaults_pick_the_fast_path_on_a_cpu_unless_turned_off(monkeypatch):
    monkeypatch.setenv("LCKV_CPU_FAST", "1")
    monkeypatch.delenv("LCKV_COMPILE", raising=False)
    settings = EngineSettings.for_device(torch.device("cpu"))
    assert settings.cpu_fast and settings.compile and settings.compiled_classes == (1, 8)
    monkeypatch.setenv("LCKV_CPU_FAST", "0")
    assert not EngineSettings.for_device(torch.device("cpu")).cpu_fast
    assert not EngineSettings.for_device(torch.device("cpu")).compile


def test_one_quantized_copy_per_model_and_the_float_model_untouched():
    model = _model()
    first = Engine(model, EngineSettings(max_batch=2, cpu_fast=True))
    second = Engine(model, EngineSettings(max_batch=2, cpu_fast=True))
    float_engine = Engine(model, EngineSettings(max_batch=2))
    try:
        assert first.step_model is second.step_model is cpu_fast_model(model)
        assert first.step_model is not model and float_engine.step_model is model
        assert isinstance(model.lm_head, torch.nn.Linear) and model.dtype == torch.float32
    finally:
        for engine in (first, second, float_engine):
            engine.close()


def _replies(model, tokenizer, engine, prompts):
    replies, names = [], set()
    for prompt in prompts:
        chat = ChatSession(model, tokenizer, cache_settings=CacheSettings(2, 24), sampling=GREEDY, engine=engine)
        end = next(e for e in chat.send(prompt) if isinstance(e, TurnEnd))
        replies.append(chat.transcript[-end.metrics.new_tokens:])
        names.add(chat.stats().decoder)
        chat.close()
    return replies, names


def test_greedy_replies_agree_with_the_float_model(tokenizer):
    """8 prompts x 16 greedy tokens through the engine, past the cache bound (26 slots). A random
    tiny model has flat logits (top-2 margins often below the int8 error), so a reply may leave
    the float one after a near tie: every reply's first tokens, and most replies whole, agree."""
    model = _model(len(tokenizer))
    fast = Engine(model, EngineSettings(max_batch=2, cpu_fast=True))
    exact = Engine(model, EngineSettings(max_batch=2))
    try:
        got, names = _replies(model, tokenizer, fast, PROMPTS)
        want, _ = _replies(model, tokenizer, exact, PROMPTS)
    finally:
        fast.close()
        exact.close()
    assert names == {fast_path_name()}
    same = [next((i for i, (a, b) in enumerate(zip(g, w)) if a != b), min(len(g), len(w))) for g, w in zip(got, want)]
    identical = sum(g == w for g, w in zip(got, want))
    assert min(same) >= 2 and identical >= len(PROMPTS) // 2, (same, identical)


def test_batched_rows_decode_as_each_row_alone():
    """Four rows stepped together against each row stepped alone, on the fast path's model: the
    products quantize each row on its own, so only the float order of attention may differ."""
    model = cpu_fast_model(_model())
    batch = model.new_cache(2, 12, batch_size=4)
    singles = [model.new_cache(2, 12) for _ in range(4)]
    prompts = torch.randint(0, 320, (4, 7), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        got = model(prompts, batch, logits_to_keep=1).logits[:, -1]
        want = torch.cat([model(prompts[i : i + 1], c, logits_to_keep=1).logits[:, -1] for i, c in enumerate(singles)])
        for _ in range(20):  # past the cache bound (14 slots)
            torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * want.abs().max().item())
            token = want.argmax(-1)
            got = model(token.view(4, 1), batch, logits_to_keep=1).logits[:, -1]
            want = torch.cat([model(token[i].view(1, 1), c, logits_to_keep=1).logits[:, -1]
                              for i, c in enumerate(singles)])


def test_the_fast_paths_bfloat16_cache_reads_as_its_float32_cache_would():
    """The fast path keeps its cache in bfloat16 (half the bytes a batched step reads): through a
    prefill, its chunks and decode steps past the cache bound, the logits stay those of the same
    model with a float32 cache, within bfloat16's rounding."""
    model = cpu_fast_model(_model())
    compact = model.new_cache(2, 12)
    model.__dict__["cache_dtype"] = torch.float32
    try:
        exact = model.new_cache(2, 12)
    finally:
        model.__dict__["cache_dtype"] = CPU_CACHE_DTYPE
    assert (compact.dtype, exact.dtype) == (torch.bfloat16, torch.float32)
    choose_attention_backend(compact), choose_attention_backend(exact)  # the decode kernel, as the engine's
    prompt = torch.randint(0, 320, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        got, want = (model(prompt, c, logits_to_keep=1).logits[:, -1] for c in (compact, exact))
        for step in range(20):  # past the cache bound (14 slots); a 3-token chunk now and then
            torch.testing.assert_close(got, want, rtol=0.03, atol=0.03 * want.abs().max().item())
            ids = want.argmax(-1).view(1, 1).expand(1, 3 if step % 7 == 3 else 1)
            got, want = (model(ids, c, logits_to_keep=1).logits[:, -1] for c in (compact, exact))
    assert compact.held_indices() == exact.held_indices()


@pytest.mark.skipif(os.environ.get("LCKV_COMPILE_TESTS") != "1", reason="compiles a step (about a minute on "
                    "two cores): run with LCKV_COMPILE_TESTS=1")
def test_the_side_compiled_step_replaces_the_eager_one_and_matches_it(tokenizer):
    """The engine compiles batch 1 on its side compiler, installs it, and names it; the compiled step
    gives the eager quantized step's logits."""
    model = tiny_model(cla_map(2, 2), num_layers=2, hidden_size=64, intermediate_size=128, vocab_size=len(tokenizer))
    engine = Engine(model, EngineSettings(max_batch=2, cpu_fast=True, compile=True, compiled_classes=(1,)))
    try:
        chat = ChatSession(model, tokenizer, cache_settings=CacheSettings(2, 24), sampling=GREEDY, engine=engine)
        eager = next(e for e in chat.send("Hello there") if isinstance(e, TurnEnd)).reply
        assert "compiling on the side" in chat.stats().decoder
        started = time.monotonic()
        while engine.stats().compiling and time.monotonic() - started < 600:
            time.sleep(0.5)
        chat.clear()
        compiled = next(e for e in chat.send("Hello there") if isinstance(e, TurnEnd)).reply
        assert chat.stats().decoder == f"{fast_path_name()}, compiled"
        assert engine.stats().counters.compiles_finished == 1
        bucket = next(iter(engine._buckets.values()))
        assert isinstance(bucket.decoder(1), CompiledCPUDecoder)
        assert compiled == eager
        # The sampler of the default width was compiled with it; it draws the eager sampler's tokens.
        vocab = len(tokenizer)
        width = width_of(SamplingSettings(), vocab)
        sampler = bucket._compiled_samplers[(1, width)]
        g = torch.Generator().manual_seed(3)
        for seed in range(20):
            logits = torch.randn(1, vocab, generator=g) * 3
            rows = RowSampling.of([SamplingSettings(temperature=0.9, top_p=0.9, repetition_penalty=1.2)], [seed], [seed])
            slots = bucket.cache.capacity
            previous, held = torch.randint(0, vocab, (1, slots), generator=g), torch.rand(1, slots, generator=g) < 0.5
            with torch.compiler.set_stance("fail_on_recompile"):
                assert torch.equal(sampler(logits, rows, width, previous, held),
                                   sample_rows(logits, rows, width, previous, held))
    finally:
        engine.close()


def test_work_before_the_engine_runs_on_a_thread_that_has_ended():
    from lckv_stream.cpu_threads import in_passing_thread

    seen: list[threading.Thread] = []

    def work(a, b=0):
        seen.append(threading.current_thread())
        return torch.ones(40_000).sum().item() + a + b  # large enough for a parallel region

    assert in_passing_thread(work, 1, b=2) == 40_003.0
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()

    def fail():
        raise ValueError("model file missing")

    with pytest.raises(ValueError, match="model file missing"):
        in_passing_thread(fail)


def test_steps_compiled_without_module_guards_do_not_share_compiled_versions():
    """The CPU step skips Dynamo's guards on the model's modules; Dynamo keeps compiled versions per
    code object, so each such step compiles a private copy of the step's code (a version made for
    one model must never answer another model's call of the same shapes)."""
    from lckv_stream.cpu_fast import CPU_COMPILE_OPTIONS
    from lckv_stream.decoding import compile_step, decode_step

    codes = [compile_step(CPU_COMPILE_OPTIONS)._torchdynamo_orig_callable.__code__ for _ in range(2)]
    assert "guard_filter_fn" in CPU_COMPILE_OPTIONS  # torch.compile empties the dict it is given
    assert codes[0] is not codes[1] and all(code is not decode_step.__code__ for code in codes)
    guarded = {key: value for key, value in CPU_COMPILE_OPTIONS.items() if key != "guard_filter_fn"}
    assert compile_step(guarded)._torchdynamo_orig_callable is decode_step


@pytest.mark.skipif(os.environ.get("LCKV_COMPILE_TESTS") != "1", reason="compiles two steps (about a minute on "
                    "two cores): run with LCKV_COMPILE_TESTS=1")
def test_two_models_of_the_same_shapes_each_get_their_own_compiled_step():
    """Two models that differ only in a module attribute the graph bakes in (the RMSNorm epsilon), with
    caches of the same shapes: each model's compiled step gives its own eager step's logits, not a
    version compiled for the other (whose guards on module attributes are skipped)."""
    from lckv_stream.cpu_fast import CPU_COMPILE_OPTIONS
    from lckv_stream.decoding import compile_step, decode_step

    tokens, token = torch.tensor([[5, 9, 11]]), torch.tensor([[7]])
    for eps in (1e-6, 0.5):
        torch.manual_seed(0)
        fast = cpu_fast_model(tiny_model(cla_map(4, 2), hidden_size=64, intermediate_size=128, rms_norm_eps=eps))
        logits = []
        for step in (compile_step(CPU_COMPILE_OPTIONS), decode_step):
            cache = fast.new_cache(2, 24)
            choose_attention_backend(cache)
            with torch.inference_mode():
                fast(tokens, cache)
                logits.append(step(fast, token, cache))
        torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4, msg=f"eps {eps}")


def test_a_failed_compile_keeps_the_eager_step_and_its_whole_error(monkeypatch, tokenizer):
    """A step that does not compile leaves the eager step serving: its name gives the start of the
    error, and the bucket keeps the whole text (a compiler's message names the line only at its end)."""
    from lckv_stream import buckets

    reason = "no compiler here: " + "x" * 200 + " (the culprit, at the end)"

    def failing_compile(options=None):
        def step(*args):
            raise RuntimeError(reason)
        return step

    monkeypatch.setattr(buckets, "compile_step", failing_compile)
    model = tiny_model(cla_map(2, 2), num_layers=2, hidden_size=64, intermediate_size=128, vocab_size=len(tokenizer))
    engine = Engine(model, EngineSettings(max_batch=2, cpu_fast=True, compile=True, compiled_classes=(1,)))
    try:
        chat = ChatSession(model, tokenizer, cache_settings=CacheSettings(2, 24), sampling=GREEDY, engine=engine)
        first = next(e for e in chat.send("Hello there") if isinstance(e, TurnEnd)).reply
        started = time.monotonic()
        while engine.stats().compiling and time.monotonic() - started < 60:
            time.sleep(0.05)
        chat.clear()
        again = next(e for e in chat.send("Hello there") if isinstance(e, TurnEnd)).reply
        bucket = next(iter(engine._buckets.values()))
        assert bucket.compile_errors == {"step of class 1": reason}
        assert f"compile failed: {reason[:80]}" in chat.stats().decoder
        assert again == first  # the eager step still serves, as before
    finally:
        engine.close()
