"""GPU-only checks of the CUDA-graph decoder (skipped without CUDA)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lckv_stream import cla_map, lckv_map
from lckv_stream.convert import convert_llama
from lckv_stream.decoding import EagerDecoder, GraphDecoder, make_decoder
from kernel_reference import CASES, check_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def smollm_shaped(layer_types: str):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0, tie_word_embeddings=True)
    return convert_llama(LlamaForCausalLM(config).to("cuda", torch.bfloat16), layer_types)


@pytest.mark.parametrize("layer_types", [cla_map(30, 2), lckv_map(30, 1, 1)])
def test_graph_replay_matches_eager_for_500_greedy_steps(layer_types):
    model = smollm_shaped(layer_types)
    prompt = torch.randint(0, 49152, (1, 40), device="cuda")
    runs = []
    for decoder_class in (EagerDecoder, GraphDecoder):
        cache = model.new_cache(sink=4, window=252)  # wraps around the ring during the run
        decoder = decoder_class(model, cache)
        logits = decoder.prefill(prompt)
        tokens, all_logits = [], []
        for _ in range(500):
            token = logits.argmax(-1)
            tokens.append(int(token))
            logits = decoder.step(token)
            all_logits.append(logits.float().clone())
        runs.append((tokens, torch.stack(all_logits), cache.held_indices()))
    (eager_tokens, eager_logits, eager_held), (graph_tokens, graph_logits, graph_held) = runs
    assert graph_tokens == eager_tokens
    assert eager_held == graph_held == list(range(4)) + list(range(540 - 252, 540))
    scale = eager_logits.abs().max()
    assert (graph_logits - eager_logits).abs().max() <= 2e-2 * scale


def test_compiled_step_follows_the_eager_logits_for_500_steps():
    """The compiled step computes attention in float32 where eager SDPA rounds differently, so with
    random weights (near-tied logits) free-running greedy paths may part. Both decoders therefore
    follow the eager greedy path: logits must agree within bf16 tolerance at every step, and so must
    the argmax wherever the eager margin exceeds twice that tolerance."""
    model = smollm_shaped(cla_map(30, 2))
    prompt = torch.randint(0, 49152, (1, 40), device="cuda")
    eager = EagerDecoder(model, model.new_cache(sink=4, window=252))
    compiled = GraphDecoder(model, model.new_cache(sink=4, window=252), compile=True)
    eager_logits, compiled_logits = eager.prefill(prompt).float(), compiled.prefill(prompt).float()
    worst, decided, agreed = 0.0, 0, 0
    for _ in range(500):
        token = eager_logits.argmax(-1)
        eager_logits = eager.step(token).float().clone()
        compiled_logits = compiled.step(token).float().clone()
        tolerance = 2e-2 * eager_logits.abs().max()
        worst = max(worst, float((compiled_logits - eager_logits).abs().max() / tolerance))
        top = eager_logits.topk(2).values[0]
        if top[0] - top[1] > 2 * tolerance:
            decided += 1
            agreed += int(compiled_logits.argmax(-1) == eager_logits.argmax(-1))
    print(f"worst logit gap {worst:.3f} of the tolerance; argmax agreed on {agreed} of {decided} clear steps")
    assert worst <= 1.0
    assert agreed == decided
    assert eager.cache.held_indices() == compiled.cache.held_indices()


def test_engine_uses_the_compiled_graph_on_cuda():
    model = smollm_shaped(cla_map(30, 2))
    decoder = make_decoder(model, model.new_cache(4, 252))  # the shapes compiled above: a cache hit
    assert decoder.name == "cuda-graph + compile, prefill graphs"


@pytest.mark.parametrize("sink, window, seen, batch, sliding, no_diagonal, block", CASES)
def test_decode_kernel_matches_a_float64_reference(sink, window, seen, batch, sliding, no_diagonal, block):
    check_case(sink, window, seen, batch, sliding, no_diagonal, block)


def test_kernel_decode_steps_follow_the_sdpa_steps(monkeypatch):
    """The model's decode steps through the kernel against the same steps through SDPA over the
    refreshed cache (LCKV_DECODE_KERNEL=0), along one greedy path of 300 steps that wraps the ring."""
    model = smollm_shaped(lckv_map(30, 1, 1))  # readers of the top layer: the no-diagonal mask too
    prompt = torch.randint(0, 49152, (1, 40), device="cuda")
    paths = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("LCKV_DECODE_KERNEL", flag)
        decoder = EagerDecoder(model, model.new_cache(sink=4, window=124))
        logits = decoder.prefill(prompt).float()
        steps = []
        for i in range(300):
            token = paths["0"][i][0] if flag == "1" else logits.argmax(-1)
            logits = decoder.step(token).float()
            steps.append((token, logits))
        paths[flag] = steps
    for (token, sdpa_logits), (_, kernel_logits) in zip(paths["0"], paths["1"]):
        assert (kernel_logits - sdpa_logits).abs().max() <= 2e-2 * sdpa_logits.abs().max()


@pytest.mark.parametrize("sink", [4, 24])
def test_prefill_graphs_match_eager_prefill(sink):
    """Turns encoded as chunks of fixed sizes replayed from CUDA graphs against eager prefill, over a
    conversation that overflows the cache (the shipped map reads only from below: chunking is exact)."""
    from lckv_stream.default_model import default_layer_types

    model = smollm_shaped(default_layer_types())
    eager = EagerDecoder(model, model.new_cache(sink, 252))
    graphs = GraphDecoder(model, model.new_cache(sink, 252), prefill_graphs=True)
    for length in (37, 1, 300, 100, 5, 700, 83):
        turn = torch.randint(0, 49152, (1, length), device="cuda")
        expected, got = eager.prefill(turn).float(), graphs.prefill(turn).float()
        assert "failed" not in graphs.name
        assert (got - expected).abs().max() <= 2e-2 * expected.abs().max()
        assert graphs.cache.held_indices() == eager.cache.held_indices()
    assert set(graphs._prefill_graphs) == {64, 16, 4}  # 256 is over the window: not captured


def _conversations(vocab: int):
    """Six conversations of different sizes, settings and lengths (two buckets), as (sink, window,
    seed, settings, prompts)."""
    from lckv_stream.sampling import SamplingSettings

    g = torch.Generator().manual_seed(3)
    sampled = SamplingSettings(temperature=0.9, top_k=50, top_p=0.9, repetition_penalty=1.1, max_new_tokens=48)
    greedy = SamplingSettings(temperature=0.0, repetition_penalty=1.3, max_new_tokens=48)
    whole = SamplingSettings(temperature=1.2, top_k=0, top_p=0.95, repetition_penalty=1.0, max_new_tokens=48)
    prompt = lambda n: torch.randint(3, vocab, (n,), generator=g).tolist()  # noqa: E731
    return [(4, 252, 1, sampled, [prompt(40), prompt(9)]), (24, 100, 2, greedy, [prompt(300), prompt(3)]),
            (0, 60, 3, whole, [prompt(17)]), (4, 1000, 4, sampled, [prompt(120), prompt(30)]),
            (4, 252, 5, greedy, [prompt(5), prompt(5), prompt(5)]), (8, 2000, 6, whole, [prompt(64)])]


def _engine_replies(engine, conversations) -> list:
    """Every conversation on its own thread at once through `engine`: the tokens of each reply."""
    import threading

    results, errors = [None] * len(conversations), []
    barrier = threading.Barrier(len(conversations))

    def work(i: int) -> None:
        sink, window, seed, settings, prompts = conversations[i]
        try:
            row = engine.open_row(sink, window, seed=seed)
            barrier.wait()
            replies = []
            for prompt in prompts:
                list(engine.prefill(row, prompt, 256, threading.Event()))
                stream, fed = engine.generate(row, settings, frozenset(), threading.Event())
                list(stream)
                replies.append(list(fed))
            results[i] = replies
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(conversations))]
    [thread.start() for thread in threads]
    [thread.join() for thread in threads]
    assert not errors, errors
    return results


@pytest.mark.parametrize("whole_step", ["0", "1"])
def test_engine_graphs_give_the_tokens_of_the_eager_engine(monkeypatch, whole_step):
    """Batched steps replayed from CUDA graphs (one per batch size class), the sampler replayed from
    graphs (or, with LCKV_WHOLE_STEP_GRAPH=1, the whole step in one graph), prefill staged through the
    spare row: the same kernels as the eager engine, so the same tokens, for conversations of two
    buckets batched together."""
    from lckv_stream.default_model import default_layer_types
    from lckv_stream.engine import Engine, EngineSettings

    monkeypatch.setenv("LCKV_WHOLE_STEP_GRAPH", whole_step)
    model = smollm_shaped(default_layer_types())
    conversations = _conversations(49152)
    # Every row reads alone (which rows read together depends on the threads' timing).
    eager = Engine(model, EngineSettings(max_batch=8, graphs=False))
    eager._options.batch_prefill = False
    eager = _engine_replies(eager, conversations)
    engine = Engine(model, EngineSettings(max_batch=8, graphs=True, compile=False))
    engine._options.prefill_graphs = False  # eager prefill on the spare row: bitwise the eager kernels
    engine._options.batch_prefill = False
    graphs = _engine_replies(engine, conversations)
    assert graphs == eager
    assert len({tuple(map(tuple, reply)) for reply in graphs}) == len(conversations)
    stats = engine.stats()
    # Each bucket steps on its own: four shapes here (windows 256, 256 with sink 32, 1024, 2048).
    assert stats.tokens > stats.steps and len(stats.buckets) == 4
    names = [bucket.decoder_name(size) for bucket in engine._buckets.values() for size in bucket.classes]
    assert all(("one graph a step" in name) == (whole_step == "1") and "failed" not in name for name in names), names


def test_engine_prefill_graphs_and_offload_to_pinned_memory():
    """Prefill chunks replayed from graphs on the spare row follow the eager engine's prefill; a row
    offloaded to pinned host memory comes back with the same next tokens as one never offloaded."""
    import threading
    import time

    from lckv_stream.default_model import default_layer_types
    from lckv_stream.engine import Engine, EngineSettings
    from lckv_stream.sampling import SamplingSettings

    model = smollm_shaped(default_layer_types())
    greedy = SamplingSettings(temperature=0.0, repetition_penalty=1.0, max_new_tokens=1)
    prompt = torch.randint(3, 49152, (700,)).tolist()
    logits = []
    for graphs in (False, True):
        engine = Engine(model, EngineSettings(max_batch=4, graphs=graphs, compile=False, idle_seconds=0.2))
        row = engine.open_row(24, 252, seed=0)
        list(engine.prefill(row, prompt, 256, threading.Event()))
        logits.append(engine.snapshot(row, with_logits=True).logits.float())
        held = engine.held_indices(row)
        assert held == list(range(24)) + list(range(700 - 252, 700))
        if graphs:
            list(engine.generate(row, greedy, frozenset(), threading.Event())[0])
            deadline = time.monotonic() + 20
            while row.residence != "host" and time.monotonic() < deadline:
                time.sleep(0.1)
            # (an empty buffer, e.g. the ring index of a map without sliding-window layers, is never pinned)
            assert row.residence == "host" and all(t.is_pinned() for t in row.host.state.values() if t.numel())
            stream, after = engine.generate(row, SamplingSettings(temperature=0.0, max_new_tokens=20), frozenset(),
                                            threading.Event())
            list(stream)
            twin = Engine(model, EngineSettings(max_batch=4, graphs=True, compile=False))
            other = twin.open_row(24, 252, seed=0)
            list(twin.prefill(other, prompt, 256, threading.Event()))
            list(twin.generate(other, greedy, frozenset(), threading.Event())[0])
            stream, expected = twin.generate(other, SamplingSettings(temperature=0.0, max_new_tokens=20),
                                             frozenset(), threading.Event())
            list(stream)
            assert after == expected
    eager_logits, graph_logits = logits
    assert (graph_logits - eager_logits).abs().max() <= 2e-2 * eager_logits.abs().max()


def test_rows_read_together_follow_each_row_read_alone():
    """Four rows' messages of different lengths in one left-padded eager call (`prefill_rows`: what
    the engine does when rows read at once, on a GPU only with `StepOptions.batch_prefill` on)
    against each row read alone through its captured chunks: next-token logits within bfloat16
    tolerance, the same slots held."""
    import threading

    from lckv_stream.default_model import default_layer_types
    from lckv_stream.engine import Engine, EngineSettings

    model = smollm_shaped(default_layer_types())
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (40, 9, 120, 64)]
    alone_engine = Engine(model, EngineSettings(max_batch=4, graphs=True, compile=False))
    alone, held = [], []
    for i, prompt in enumerate(prompts):  # one at a time: each reads alone
        row = alone_engine.open_row(4, 252, seed=i)
        list(alone_engine.prefill(row, prompt, 256, threading.Event()))
        alone.append(alone_engine.snapshot(row, with_logits=True).logits.float())
        held.append(alone_engine.held_indices(row))
    engine = Engine(model, EngineSettings(max_batch=4, graphs=True, compile=False))
    rows = [engine.open_row(4, 252, seed=i) for i in range(len(prompts))]
    for row in rows:
        engine.make_resident(row)
    assert [row.index for row in rows] == [0, 1, 2, 3]
    bucket = rows[0].bucket

    def read_together() -> torch.Tensor:
        bucket.prefill_rows(0, prompts, model.encodes_sequentially(max(map(len, prompts))))
        for row, prompt in zip(rows, prompts):
            row.seen = len(prompt)
        return bucket.next_logits[: len(prompts)].float().cpu()

    together = engine._call(read_together)
    for i in range(len(prompts)):
        expected = alone[i].reshape(-1).cpu()
        assert (together[i] - expected).abs().max() <= 2e-2 * expected.abs().max(), i
        assert engine.held_indices(rows[i]) == held[i]


def test_prefill_chunks_compile_on_the_gpu_after_the_steps():
    """The side compiler's prefill chunk compile on CUDA (the chunk length a symbol), after two
    fixed-shape steps of the same code, as an engine compiles them: it compiles (torch 2.11's
    compiler once refused the attention's bool index here) and follows the eager chunks."""
    from lckv_stream.buckets import Bucket, Counters, SideCompiler, StepOptions
    from lckv_stream.decoding import compile_step, decode_step

    model = smollm_shaped(cla_map(30, 2))
    buckets = [Bucket(model, 4, 252, rows=2, options=StepOptions(), counters=Counters()) for _ in range(2)]
    for batch in (1, 2):
        with torch.inference_mode():
            cache = model.new_cache(4, 252, batch_size=batch)
            compile_step({})(model, torch.zeros(batch, 1, dtype=torch.long, device="cuda"), cache)
    compiled = SideCompiler()._compile_prefill(buckets[0], 0)
    assert callable(compiled), compiled
    compiled_row, eager_row = (bucket.cache.rows(bucket.spare, bucket.spare + 1) for bucket in buckets)
    torch.manual_seed(2)
    with torch.inference_mode():
        for size in (64, 16, 4, 40):
            ids = torch.randint(0, 49152, (1, size), device="cuda")
            with torch.compiler.set_stance("fail_on_recompile"):
                got = compiled(model, ids, compiled_row)
            expected = decode_step(model, ids, eager_row)
            assert (got.float() - expected.float()).abs().max() <= 2e-2 * expected.float().abs().max(), size
            assert compiled_row.held_indices(0) == eager_row.held_indices(0)


def test_engine_compiles_on_the_side_and_installs_the_compiled_steps():
    """At start the default bucket is captured with plain graphs and served at once; the compiled
    steps, sampler and prefill chunks (64, 16 and 4 tokens for a 252-slot window) replace them as
    they finish, with no compile or capture afterwards on the hot path. A row then reads messages
    as a row of a plain-graph engine does (pending logits within bfloat16 tolerance, the same slots)."""
    import threading
    import time

    from lckv_stream.default_model import default_layer_types
    from lckv_stream.engine import Engine, EngineSettings
    from lckv_stream.sampling import SamplingSettings, width_of

    model = smollm_shaped(default_layer_types())
    started = time.perf_counter()
    engine = Engine(model, EngineSettings(max_batch=2, graphs=True, compile=True, warm_shape=(4, 252)))
    ready_in = time.perf_counter() - started
    row = engine.open_row(4, 252, seed=0)
    list(engine.prefill(row, [5, 6, 7], 256, threading.Event()))
    first = time.perf_counter() - started
    stream, _ = engine.generate(row, SamplingSettings(temperature=0.0, max_new_tokens=4), frozenset(), threading.Event())
    list(stream)
    print(f"engine ready in {ready_in:.1f} s; first tokens at {time.perf_counter() - started:.1f} s (prefill done {first:.1f} s)")
    assert "compiling on the side" in engine.decoder_name(row) or engine.stats().compiling == 0
    deadline = time.monotonic() + 560
    while engine.stats().compiling and time.monotonic() < deadline:
        list(engine.generate(row, SamplingSettings(temperature=0.0, max_new_tokens=2), frozenset(), threading.Event())[0])
        time.sleep(0.5)
    assert engine.stats().compiling == 0
    name = engine.decoder_name(row)
    assert name.startswith("cuda-graph + compile") and "failed" not in name, name
    counters = (engine.counters.decoders_built, engine.counters.graphs_captured)
    rows = [engine.open_row(4, 200 + i, seed=i) for i in range(2)]
    for _ in range(3):
        for r in rows:
            list(engine.prefill(r, [8, 9], 256, threading.Event()))
        streams = [engine.generate(r, SamplingSettings(temperature=0.7, max_new_tokens=8), frozenset(),
                                   threading.Event())[0] for r in rows]
        [list(s) for s in streams]
    assert (engine.counters.decoders_built, engine.counters.graphs_captured) == counters
    bucket = next(iter(engine._buckets.values()))
    width = width_of(SamplingSettings(), 49152)
    assert all((size, width) in bucket._compiled_samplers for size in bucket.classes)  # captured with the steps
    prefill_name = bucket._prefill_decoder.name
    assert "compiled prefill" in prefill_name and "failed" not in prefill_name, (prefill_name, bucket.compile_errors)
    plain = Engine(model, EngineSettings(max_batch=2, graphs=True, compile=False))
    g = torch.Generator().manual_seed(5)
    messages = [torch.randint(3, 49152, (n,), generator=g).tolist() for n in (100, 37, 5, 300)]
    pair = [plain.open_row(4, 252, seed=0), engine.open_row(4, 252, seed=0)]
    for message in messages:  # 64+16+16+4, 16+16+4+1, 4+1, then a read past the window
        pending = []
        for e, r in zip((plain, engine), pair):
            list(e.prefill(r, message, 256, threading.Event()))
            pending.append(e.snapshot(r, with_logits=True).logits.float())
        assert (pending[1] - pending[0]).abs().max() <= 2e-2 * pending[0].abs().max()
        assert plain.held_indices(pair[0]) == engine.held_indices(pair[1])
    assert (engine.counters.decoders_built, engine.counters.graphs_captured) == counters
    print(f"compiled {engine.counters.compiles_finished} steps and chunks in {engine.counters.compile_seconds:.0f} s")


@pytest.mark.parametrize("size", [1, 64])
def test_compiled_sampler_replayed_from_a_graph_draws_the_eager_samplers_tokens(size):
    """The sampler the side compiler builds for a batch class, captured in a CUDA graph as a bucket
    captures it, draws the eager sampler's tokens: rows greedy and sampled, with and without top-p
    and repetition penalty, over many draws (the noise hash is integer arithmetic: exact)."""
    from types import SimpleNamespace

    from lckv_stream.buckets import _compile_sampler
    from lckv_stream.decoding import capture
    from lckv_stream.sampling import RowSampling, SamplingSettings, sample_rows, width_of

    vocab, slots = 49152, 1040
    width = width_of(SamplingSettings(), vocab)
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = torch.zeros(size, vocab, dtype=torch.bfloat16, device="cuda")
    scratch = SimpleNamespace(token_ids=torch.randint(0, vocab, (size, slots), device="cuda", generator=g),
                              token_index=torch.randint(-1, 2000, (size, slots), device="cuda", generator=g))
    sampler = _compile_sampler(scratch, size, logits)
    rows = RowSampling.of([SamplingSettings(temperature=[0.0, 0.7, 1.0, 1.3][i % 4], top_p=[1.0, 0.9, 0.95][i % 3],
                                            repetition_penalty=[1.0, 1.1, 1.3][i % 3]) for i in range(size)],
                          seeds=list(range(size)), draws=[0] * size, device="cuda")
    held = scratch.token_index >= 0
    graph, tokens = capture(lambda: sampler(logits, rows, width, scratch.token_ids, held), None, warmup=1)
    mismatches = 0
    for draw in range(200 if size == 1 else 20):
        logits.copy_(torch.randn(size, vocab, device="cuda", generator=g) * 4)
        rows.draws.fill_(draw)
        graph.replay()
        expected = sample_rows(logits, rows, width, scratch.token_ids, held)
        mismatches += int((tokens != expected).sum())
    assert mismatches == 0


def test_a_read_alone_and_a_row_swap_queue_no_host_sync():
    """A row reading through the spare row's captured chunks, and two rows trading places, only queue
    work behind the step in flight: a host sync there would stall every generating row."""
    from lckv_stream.buckets import Bucket, Counters, StepOptions
    from lckv_stream.default_model import default_layer_types

    model = smollm_shaped(default_layer_types())
    bucket = Bucket(model, 4, 252, rows=4, options=StepOptions(graphs=True, compile=False, batch_prefill=False),
                    counters=Counters())
    ids = torch.arange(5, 25, device="cuda").view(1, 20)  # chunks of 16 and 4
    bucket.prefill(0, ids)
    expected = bucket.next_logits[0].clone()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        bucket.prefill(1, ids)
        bucket.swap(1, 2)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert torch.equal(bucket.next_logits[2], expected)
    assert bucket.cache.held_indices(2) == bucket.cache.held_indices(0)


def test_a_message_reaches_the_device_without_waiting_for_the_step_in_flight():
    """A read's token ids (and a reply's stop tokens) cross through pinned memory: from pageable
    memory the copy would first wait for the queued work, a whole step."""
    import time

    from lckv_stream.buckets import queued_copy

    def host_ms(copy) -> tuple[float, torch.Tensor]:
        torch.cuda.synchronize()
        torch.cuda._sleep(400_000_000)  # a few hundred ms of queued device work, as a step in flight
        began = time.perf_counter()
        moved = copy(torch.arange(5, 25))
        elapsed = (time.perf_counter() - began) * 1e3
        torch.cuda.synchronize()
        return elapsed, moved

    pageable_ms, _ = host_ms(lambda ids: ids.to("cuda", non_blocking=True))
    queued_ms, moved = host_ms(lambda ids: queued_copy(ids, torch.device("cuda")))
    assert pageable_ms > 50, "the queued work was too short to tell a wait from none"
    assert queued_ms < 10, (queued_ms, pageable_ms)
    assert moved.tolist() == list(range(5, 25))


def test_pinned_pool_pages_wait_for_the_copies_queued_before_their_release():
    """A host copy's pages, given back while a copy out of them is still queued, are not handed to
    the next copy (whose host-side writes would change what the queued copy reads) until it ran."""
    from lckv_stream.host_pool import HostPool

    host = HostPool(slab_bytes=2**20, page_bytes=2**16)  # pinned
    block = host.allocate(2**19)
    assert block.is_pinned()
    block.copy_(torch.arange(2**19, dtype=torch.int64).remainder(251).to(torch.uint8))
    expected = block.clone()
    on_device = torch.empty(2**19, dtype=torch.uint8, device="cuda")
    torch.cuda._sleep(400_000_000)  # the copy below waits behind a few hundred ms of device work
    on_device.copy_(block, non_blocking=True)
    host.free(block)
    for _ in range(3):  # half a slab each: the first fits beside the released pages, then it must wait
        host.allocate(2**19).fill_(255)
    torch.cuda.synchronize()
    assert torch.equal(on_device.cpu(), expected)
    assert host.reserved_bytes == 2 * 2**20  # the second took the released pages (after waiting), the third a new slab


def test_two_sessions_generating_at_once_get_the_tokens_each_gets_alone():
    """Two users at once on one GPU, each on its own thread through one engine, get the replies each
    gets alone, and nothing falls back or fails."""
    import threading
    import traceback

    from app_support.tiny import tiny_model, tiny_tokenizer
    from lckv_stream.chat import CacheSettings, ChatSession
    from lckv_stream.engine import Engine, EngineSettings
    from lckv_stream.sampling import SamplingSettings

    tokenizer = tiny_tokenizer()
    model = tiny_model(cla_map(4), vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512)
    model = model.to("cuda", torch.bfloat16)
    settings = [SamplingSettings(temperature=0.9, top_k=20, max_new_tokens=40),
                SamplingSettings(temperature=0.0, max_new_tokens=40)]
    engine = Engine(model, EngineSettings(max_batch=4, graphs=True, compile=False))

    def conversation(seed: int) -> tuple[list[str], str]:
        chat = ChatSession(model, tokenizer, cache_settings=CacheSettings(4, 60), seed=seed, engine=engine)
        replies = [list(chat.send(f"message {turn} " * (turn + 1), settings[(seed + turn) % 2]))[-1].reply
                   for turn in range(6)]
        return replies, chat.stats().decoder

    alone = [conversation(seed) for seed in (1, 2)]
    together, errors = [None, None], []

    def worker(index: int) -> None:
        try:
            together[index] = conversation(index + 1)
        except Exception:  # reported below: a thread's exception would otherwise be lost
            errors.append(traceback.format_exc())

    threads = [threading.Thread(target=worker, args=(index,)) for index in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, "\n".join(errors)
    assert [r for r, _ in together] == [r for r, _ in alone]
    assert all("failed" not in decoder for _, decoder in alone + together)


@pytest.mark.parametrize("mode", ["persistent", "layers"])
def test_fused_step_follows_the_eager_step_on_small_models(mode):
    """The check the interpreted CPU test runs, on the real kernels in bfloat16: three layer maps,
    rows of other sizes, rings that wrap, rows that do not step."""
    from fused_reference import check_fused_step

    for layer_types in ("cla", "lckv", "plain"):
        worst = check_fused_step(layer_types, mode, [(4, 12), (2, 8), (4, 5)], steps=40, programs=None,
                                 device="cuda", dtype=torch.bfloat16)
        print(f"{layer_types} {mode}: worst logit gap {worst:.4f} of the scale")


@pytest.mark.parametrize("mode", ["persistent", "layers"])
@pytest.mark.parametrize("rows", [1, 8])
def test_fused_step_in_a_graph_follows_the_eager_step_for_300_steps(mode, rows):
    """The default model's shape and map, random weights, bfloat16, the fused step captured in a CUDA
    graph and fed the eager step's greedy tokens: logits within bfloat16 tolerance at every step, the
    same argmax wherever the eager margin is clear, and the caches holding the same tokens."""
    from lckv_stream.default_model import default_layer_types
    from lckv_stream.fused_step import FusedStep
    from lckv_stream.fusion import fuse_projections

    model = smollm_shaped(default_layer_types())
    fuse_projections(model)
    prompt = torch.randint(0, 49152, (rows, 40), device="cuda")
    eager = EagerDecoder(model, model.new_cache(sink=4, window=252, batch_size=rows))
    cache = model.new_cache(sink=4, window=252, batch_size=rows)  # wraps around the ring during the run
    fused = GraphDecoder(model, cache, step_function=FusedStep(model, cache, mode=mode))
    eager_logits = eager.prefill(prompt).float()
    fused.prefill(prompt)
    worst, decided, agreed = 0.0, 0, 0
    for _ in range(300):
        token = eager_logits.argmax(-1)
        eager_logits = eager.step(token).float().clone()
        fused_logits = fused.step(token).float().clone()
        tolerance = 2e-2 * eager_logits.abs().amax(-1, keepdim=True)
        worst = max(worst, float(((fused_logits - eager_logits).abs() / tolerance).max()))
        top = eager_logits.topk(2).values
        clear = top[:, 0] - top[:, 1] > 2 * tolerance[:, 0]
        decided += int(clear.sum())
        agreed += int((clear & (fused_logits.argmax(-1) == eager_logits.argmax(-1))).sum())
    print(f"{mode}, {rows} rows: worst logit gap {worst:.3f} of the tolerance; argmax agreed on {agreed} of "
          f"{decided} clear steps")
    assert worst <= 1.0
    assert agreed == decided
    assert all(eager.cache.held_indices(row) == cache.held_indices(row) for row in range(rows))


@pytest.mark.parametrize("mode", ["persistent", "layers"])
def test_engine_serves_classes_up_to_8_rows_with_the_fused_step(monkeypatch, mode):
    """LCKV_FUSED_STEP: the engine's steps of 1 to 8 rows run the fused step (nothing compiled for
    them), larger classes keep theirs; conversations of two buckets reply through it."""
    from lckv_stream.default_model import default_layer_types
    from lckv_stream.engine import Engine, EngineSettings

    monkeypatch.setenv("LCKV_FUSED_STEP", mode)
    model = smollm_shaped(default_layer_types())
    engine = Engine(model, EngineSettings(max_batch=16, graphs=True, compile=False))
    replies = _engine_replies(engine, _conversations(49152)[:3])
    assert all(len(reply) == 48 for conversation in replies for reply in conversation)
    for bucket in engine._buckets.values():
        for size in bucket.classes:
            name = bucket.decoder_name(size)
            assert (f"fused ({mode})" in name) == (size <= 8) and "failed" not in name, name
