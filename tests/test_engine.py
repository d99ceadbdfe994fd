"""The serving engine against each conversation alone.

The reference is written apart from the engine: the model run token by token on a cache of exactly
the conversation's own sink and window (no bucket, no batching), sampled with the same per-row
sampler and draw numbers. The engine must give every conversation exactly the tokens it gives alone,
batched with others of other sizes, settings and lengths, joining and leaving mid-stream.
"""

import collections
import os
import threading
import time
from dataclasses import dataclass, field

import pytest
import torch

from app_support.tiny import tiny_model
from lckv_stream import cla_map, lckv_map
from lckv_stream.buckets import bucket_shape
import lckv_stream.engine as engine_module
from lckv_stream.engine import RUN_AHEAD, Engine, EngineSettings, JobStream, MB
from lckv_stream.packed_state import clone_state, state_bytes
from lckv_stream.sampling import RowSampling, SamplingSettings, sample_rows, width_of

STOP_IDS = frozenset({2})
GREEDY = SamplingSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=12)
HOT = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=12)
STOPPED = SamplingSettings(temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, max_new_tokens=40)
NUCLEUS = SamplingSettings(temperature=0.8, top_k=20, top_p=0.9, repetition_penalty=1.3, max_new_tokens=12)


@dataclass
class Spec:
    """One conversation: its cache sizes, seed, sampling and the prompts of its turns."""

    sink: int
    window: int
    seed: int
    settings: SamplingSettings
    turns: list[list[int]]
    stop_after: int | None = None  # stop the first turn's reply after this many tokens
    tokens: list[list[int]] = field(default_factory=list)


def specs(vocab: int = 300) -> list[Spec]:
    g = torch.Generator().manual_seed(7)

    def prompt(n: int) -> list[int]:
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    long = SamplingSettings(temperature=0.9, top_k=50, top_p=0.95, repetition_penalty=1.1, max_new_tokens=60)
    return [
        Spec(4, 64, 1, GREEDY, [prompt(9), prompt(30)]),
        Spec(2, 100, 2, HOT, [prompt(70), prompt(5)]),  # its first prompt fills the row past one chunk
        Spec(10, 40, 3, NUCLEUS, [prompt(3), prompt(20), prompt(11)]),
        Spec(0, 24, 4, long, [prompt(40)]),  # the ring wraps several times while it generates
        Spec(4, 300, 5, HOT, [prompt(12), prompt(6)]),  # another bucket (window 512)
        Spec(4, 64, 6, STOPPED, [prompt(8), prompt(8)], stop_after=3),
    ]


def reference(model, spec: Spec, chunk: int, stopped_at: int | None = None) -> tuple[list[list[int]], torch.Tensor]:
    """The conversation alone: its own exact-size cache, prompts in chunks of `chunk`, one token at
    a time; the first reply stopped after `stopped_at` tokens when the conversation stops it (where
    a stop lands depends on how far the engine ran ahead of its reader)."""
    vocab = model.config.vocab_size
    cache = model.new_cache(spec.sink, spec.window)
    draws, replies = 0, []
    with torch.inference_mode():
        for turn, prompt in enumerate(spec.turns):
            for start in range(0, len(prompt), chunk):
                logits = model(torch.tensor([prompt[start : start + chunk]]), cache, logits_to_keep=1).logits[:, -1]
            reply = []
            limit = spec.settings.max_new_tokens
            if turn == 0 and stopped_at is not None:
                limit = stopped_at
            while len(reply) < limit:
                rows = RowSampling.of([spec.settings], [spec.seed], [draws])
                token = sample_rows(logits, rows, width_of(spec.settings, vocab), cache.token_ids, cache.token_index >= 0)
                draws += 1
                reply.append(int(token))
                logits = model(token.view(1, 1), cache, logits_to_keep=1).logits[:, -1]
                if reply[-1] in STOP_IDS:
                    break
            replies.append(reply)
    return replies, logits[0]


def run_conversation(engine: Engine, spec: Spec, chunk: int, start: threading.Barrier | None = None):
    """The conversation through the engine; returns its replies and its final pending logits."""
    row = engine.open_row(spec.sink, spec.window, seed=spec.seed)
    replies = []
    if start is not None:
        start.wait()
    for turn, prompt in enumerate(spec.turns):
        list(engine.prefill(row, prompt, chunk, threading.Event()))
        stop = threading.Event()
        stream, fed = engine.generate(row, spec.settings, STOP_IDS, stop)
        for count, _ in enumerate(stream, 1):
            if turn == 0 and count == spec.stop_after:
                stop.set()
            if count % 5 == 0:
                time.sleep(0.002)  # readers at different paces: rows join, pause and leave unevenly
        replies.append(list(fed))
    logits = engine.snapshot(row, with_logits=True).logits
    engine.close_row(row)
    return replies, logits


def together(engine: Engine, conversations: list[Spec], chunk: int) -> list:
    results = [None] * len(conversations)
    errors = []
    barrier = threading.Barrier(len(conversations))

    def work(i: int) -> None:
        try:
            results[i] = run_conversation(engine, conversations[i], chunk, barrier)
        except Exception as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(conversations))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    return results


# overlap_steps: each step queued before the last one's tokens are read (the GPU's default): rows
# that end in a step must be left out of the one queued behind it by the device itself.
# batch_prefill False: rows that read at once read one after another (a GPU's default), several a
# scheduler iteration while the prefill budget lasts.
@pytest.mark.parametrize("layer_types, overlap, batch_prefill", [
    (cla_map(4, 2), False, True), (cla_map(4, 2), True, True), (lckv_map(4), True, True), (cla_map(4, 2), True, False)])
def test_conversations_decoded_together_get_exactly_what_each_gets_alone(layer_types, overlap, batch_prefill):
    model = tiny_model(layer_types)
    # Reading one after another, a budget of three chunks: up to three rows read in one iteration.
    engine = Engine(model, EngineSettings(max_batch=8, prefill_tokens=16 if batch_prefill else 48,
                                          overlap_steps=overlap))
    engine._options.batch_prefill = batch_prefill
    conversations = specs()
    got = together(engine, conversations, chunk=16)
    for spec, (replies, logits) in zip(conversations, got):
        stopped_at = None if spec.stop_after is None else len(replies[0])
        expected, expected_logits = reference(model, spec, chunk=16, stopped_at=stopped_at)
        assert replies == expected, f"conversation with seed {spec.seed}"
        assert (logits.float() - expected_logits).abs().max() < 1e-4
    stopped = len(got[5][0][0])
    assert 3 <= stopped <= 3 + RUN_AHEAD + 1 < conversations[5].settings.max_new_tokens
    stats = engine.stats()
    assert stats.tokens > stats.steps * 1.5, "the conversations were not batched"
    assert len(stats.buckets) == 2  # windows 24..100 share one shape; 300 has its own
    engine.close()


def test_owners_woken_only_now_and_then_still_get_every_token_exactly(monkeypatch):
    # Every owner's wake held back for 20 ms x rows: tokens reach owners in bursts, a paused row
    # (run-ahead) must still be woken, and nothing may change in what each conversation gets.
    monkeypatch.setattr(engine_module, "WAKE_MS_PER_ROW", 20.0)
    held = []
    put = JobStream.put

    def counting_put(self, *args, **kwargs):
        delivered = put(self, *args, **kwargs)
        held.append(not delivered)
        return delivered

    monkeypatch.setattr(JobStream, "put", counting_put)
    model = tiny_model(cla_map(4, 2))
    engine = Engine(model, EngineSettings(max_batch=8, prefill_tokens=16, overlap_steps=True))
    conversations = specs()
    got = together(engine, conversations, chunk=16)
    for spec, (replies, _) in zip(conversations, got):
        stopped_at = None if spec.stop_after is None else len(replies[0])
        assert replies == reference(model, spec, chunk=16, stopped_at=stopped_at)[0], f"seed {spec.seed}"
    assert sum(held) > len(held) / 4, "the wakes were not held back: this test did not test that"
    assert 3 <= len(got[5][0][0]) <= 3 + RUN_AHEAD + 1
    engine.close()


def test_a_stream_delivers_held_events_once_due_and_its_end_at_once():
    stream = JobStream()
    received = []
    owner = threading.Thread(target=lambda: received.extend(stream))
    owner.start()
    now = time.perf_counter()
    assert stream.put("first", now, wake_interval=10.0)  # the first event: at once
    assert not stream.put("second", now + 1.0, wake_interval=10.0)  # held back
    assert not stream.wake_if_due(now + 5.0, 10.0)
    assert stream.wake_if_due(now + 11.0, 10.0)
    assert not stream.put("third", now + 12.0, wake_interval=10.0)
    stream.end("eos")  # the end wakes the owner whatever is held
    owner.join(timeout=5)
    assert not owner.is_alive() and received == ["first", "second", "third"] and stream.reason == "eos"
    assert stream.backlog == 0


def test_rows_reading_alone_take_one_read_an_iteration_while_rows_generate():
    """Rows reading one after another (a GPU's way) share the prefill budget only while nothing
    generates: a read costs a whole forward pass however short, so with a row generating each
    iteration reads one row, and the generating row steps between every two reads."""
    model = tiny_model(cla_map(4, 2))
    engine = Engine(model, EngineSettings(max_batch=8, prefill_tokens=48, overlap_steps=True))
    engine._options.batch_prefill = False
    iteration, reads = [0], []  # reads: (iteration, a decode step queued in it)
    run_iteration, read = engine._iteration, engine._read

    def counted_iteration(block: bool) -> None:
        iteration[0] += 1
        run_iteration(block)

    def recorded_read(group) -> None:
        reads.append((iteration[0], bool(engine._in_flight)))
        read(group)

    engine._iteration, engine._read = counted_iteration, recorded_read
    g = torch.Generator().manual_seed(3)
    rows = [engine.open_row(4, 64, seed=i) for i in range(4)]
    messages = [torch.randint(3, 300, (12,), generator=g).tolist() for _ in rows]

    def read_at_once(readers: list) -> list[JobStream]:
        # Submitted from the engine's own thread: every job arrives in the same iteration.
        return engine._call(lambda: [engine.prefill(row, messages[i], 16, threading.Event())
                                     for i, row in readers])

    for stream in read_at_once(list(enumerate(rows[:3]))):
        list(stream)
    idle_reads = list(reads)
    assert max(collections.Counter(i for i, _ in idle_reads).values()) == 3  # 3 x 12 tokens within 48
    reads.clear()
    list(engine.prefill(rows[3], messages[3], 16, threading.Event()))
    settings = SamplingSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=40)
    stream, _ = engine.generate(rows[3], settings, frozenset(), threading.Event())
    events = iter(stream)
    next(events)  # the row generates now
    readers = read_at_once(list(enumerate(rows[:3])))
    for reader in readers:
        list(reader)
    list(events)
    during = [(i, queued) for i, queued in reads if queued]
    assert len(during) >= 2, "no read ran while the row generated: this test did not test that"
    per_iteration = collections.Counter(i for i, _ in during)
    assert max(per_iteration.values()) == 1
    engine.close()


def test_a_conversation_alone_in_the_engine_equals_it_in_a_crowd():
    model = tiny_model(cla_map(4, 2))
    conversations = [spec for spec in specs() if spec.stop_after is None]
    crowd = together(Engine(model, EngineSettings(max_batch=8, prefill_tokens=16)), conversations, 16)
    alone_engine = Engine(model, EngineSettings(max_batch=8, prefill_tokens=16))
    for spec, (replies, logits) in zip(conversations, crowd):
        alone_replies, alone_logits = run_conversation(alone_engine, spec, 16)
        assert alone_replies == replies
        assert (alone_logits.float() - logits.float()).abs().max() < 1e-5


def test_offloaded_rows_come_back_exactly_and_dropped_ones_are_rebuilt_by_their_owner():
    model = tiny_model(cla_map(4, 2))
    engine = Engine(model, EngineSettings(max_batch=2, idle_seconds=0.05, prefill_tokens=16))
    spec = specs()[0]
    never = Engine(model, EngineSettings(max_batch=2, prefill_tokens=16))
    expected, _ = run_conversation(never, spec, 16)

    row = engine.open_row(spec.sink, spec.window, seed=spec.seed)
    replies = []
    for prompt in spec.turns:
        list(engine.prefill(row, prompt, 16, threading.Event()))
        stream, fed = engine.generate(row, spec.settings, STOP_IDS, threading.Event())
        list(stream)
        replies.append(list(fed))
        deadline = time.monotonic() + 10
        while row.residence != "host" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert row.residence == "host"  # idle: its state waits in host memory, the device row is free
        assert engine.stats().buckets[0]["rows_used"] == 0
    assert replies == expected
    assert not row.lost


def test_past_the_host_budget_the_oldest_idle_rows_are_dropped():
    model = tiny_model(cla_map(4, 2))
    probe = Engine(model, EngineSettings(max_batch=1, prefill_tokens=16))
    first, second = probe.open_row(4, 64, seed=0), probe.open_row(4, 64, seed=1)
    for row in (first, second):
        list(probe.prefill(row, [5, 6, 7], 16, threading.Event()))
    copy_mb = probe.stats().host_mb  # the first row's host copy alone
    assert first.residence == "host" and 0 < copy_mb

    engine = Engine(model, EngineSettings(max_batch=1, host_mb=1.5 * copy_mb, prefill_tokens=16))
    rows = [engine.open_row(4, 64, seed=i) for i in range(4)]
    for row in rows:  # one device row: each new one pushes the previous to the host
        list(engine.prefill(row, [5, 6, 7], 16, threading.Event()))
    assert rows[-1].residence == "device"
    assert [row.lost for row in rows] == [True, True, False, False]  # the budget holds one copy: the oldest go
    assert all(row.residence == "none" and row.seen == 0 for row in rows[:2])
    assert engine.stats().host_mb == pytest.approx(copy_mb)
    assert rows[2].residence == "host" and rows[2].seen == 3
    assert engine.held_indices(rows[2]) == [0, 1, 2]


def test_host_copies_in_the_pinned_pool_come_back_exactly_and_give_their_pages_back(monkeypatch):
    """As on a GPU, host copies in the engine's pool (here of ordinary memory) and staged through a
    device block: rows that push each other out every turn, or are restored from a snapshot while
    away, give the replies of an engine that never offloads; the budget counts the pages the copies
    take, the oldest go past it, and closing every row gives every page back."""
    from lckv_stream.cache import SinkWindowCache
    from lckv_stream.host_pool import HostPool

    monkeypatch.setattr(SinkWindowCache, "_stages_transfers", property(lambda self: True))
    model = tiny_model(cla_map(4, 2))
    never = Engine(model, EngineSettings(max_batch=4, prefill_tokens=16))
    engine = Engine(model, EngineSettings(max_batch=1, prefill_tokens=16))
    engine._host_pool = host = HostPool(slab_bytes=2**20, page_bytes=4096, pin=False)
    for conversation in specs()[:3]:
        expected, _ = run_conversation(never, conversation, 16)
        rows = [engine.open_row(conversation.sink, conversation.window, seed=conversation.seed) for _ in range(2)]
        replies = [[], []]
        for prompt in conversation.turns:  # one device row: the two rows push each other out every turn
            for row, got in zip(rows, replies):
                list(engine.prefill(row, prompt, 16, threading.Event()))
                stream, fed = engine.generate(row, conversation.settings, STOP_IDS, threading.Event())
                list(stream)
                got.append(list(fed))
        assert replies == [expected, expected]
        away = rows[0]
        engine._call(host.settle)
        assert away.residence == "host" and engine.stats().host_mb * MB == host.used_bytes > 0
        engine.restore(away, engine.snapshot(away))  # a copy of the snapshot in the pool, the old one given back
        engine._call(host.settle)
        assert engine.stats().host_mb * MB == host.used_bytes
        assert engine.held_indices(away) == engine.held_indices(rows[1])
        for row in rows:
            engine.close_row(row)
    engine._call(host.settle)
    assert engine.stats().host_mb == 0 == host.used_bytes and host.reserved_bytes == 2**20  # one slab kept

    footprint = None
    for budget_copies in (None, 1.5):  # first: one copy's pages; then a budget of one and a half copies
        settings = EngineSettings(max_batch=1, prefill_tokens=16,
                                  **({"host_mb": budget_copies * footprint / MB} if footprint else {}))
        tight = Engine(model, settings)
        tight._host_pool = pages = HostPool(slab_bytes=2**20, page_bytes=4096, pin=False)
        rows = [tight.open_row(4, 64, seed=i) for i in range(4 if footprint else 2)]
        for row in rows:  # one device row: each new one pushes the previous to the host
            list(tight.prefill(row, [5, 6, 7], 16, threading.Event()))
        tight._call(pages.settle)
        footprint = tight.stats().host_mb * MB
        assert footprint % 4096 == 0 and footprint == pages.used_bytes
    assert [row.lost for row in rows] == [True, True, False, False]
    assert rows[2].residence == "host" and tight.held_indices(rows[2]) == [0, 1, 2]


def test_snapshots_in_the_pool_give_their_pages_back_when_their_owner_drops_them(monkeypatch):
    """Undo/regenerate snapshots come from the pool too (no power-of-two rounding on a GPU): one
    taken into an earlier one reuses its pages, a restore from it gives the same reply as the first
    time, and dropping the snapshots on the owner's thread gives their pages back."""
    import gc

    from lckv_stream.cache import SinkWindowCache
    from lckv_stream.host_pool import HostPool

    monkeypatch.setattr(SinkWindowCache, "_stages_transfers", property(lambda self: True))
    model = tiny_model(cla_map(4, 2))
    engine = Engine(model, EngineSettings(max_batch=2, prefill_tokens=16))
    engine._host_pool = host = HostPool(slab_bytes=2**20, page_bytes=4096, pin=False)
    row, away = engine.open_row(4, 32, seed=0), engine.open_row(4, 32, seed=1)
    list(engine.prefill(row, list(range(5, 25)), 16, threading.Event()))
    saved = engine.snapshot(row, with_logits=True)
    taken = host.used_bytes
    again = engine.snapshot(row, with_logits=True, into=saved)  # as a session's next turn does
    assert host.used_bytes == taken > 0
    first, fed = engine.generate(row, GREEDY, frozenset(), threading.Event())
    list(first)
    engine.restore(row, again)
    replay, fed_again = engine.generate(row, GREEDY, frozenset(), threading.Event())
    list(replay)
    assert fed_again == fed
    list(engine.prefill(away, [5, 6, 7], 16, threading.Event()))
    engine._call(lambda: engine._offload(away))
    hosted = engine.snapshot(away)  # a row in host memory: its copy cloned into the pool
    engine._call(host.settle)
    assert host.used_bytes == taken + 2 * engine.stats().host_mb * MB
    del saved, again, hosted
    gc.collect()
    engine._call(host.settle)
    assert host.used_bytes == engine.stats().host_mb * MB > 0  # only the host copy of `away` is left


@pytest.mark.parametrize("staged", [False, True], ids=["direct", "through-a-device-block"])
def test_a_host_copy_holds_what_the_row_holds_and_comes_back_exactly(staged):
    """A short conversation's host copy is a small part of the row's buffers; a full one, all of it.
    Either comes back bit for bit (keys, values, stream indices, sizes), packed or cloned, copied
    part by part (a CPU's way) or gathered in a block on the device first (a GPU's)."""
    model = tiny_model(cla_map(4, 2))
    engine = Engine(model, EngineSettings(max_batch=2, prefill_tokens=16))
    short, full = engine.open_row(4, 60, seed=0), engine.open_row(16, 256, seed=1)  # one bucket
    list(engine.prefill(short, [5, 6, 7], 16, threading.Event()))
    list(engine.prefill(full, [5 + i % 50 for i in range(300)], 16, threading.Event()))  # every slot held
    cache = short.bucket.cache
    cache.stage_transfers = staged
    before = {name: buffer.clone() for name, buffer in cache._state(sizes=True)}
    short_copy = cache.row_state(short.index)
    full_copy = cache.row_state(full.index)
    assert state_bytes(short_copy) < cache.row_bytes / 5 < cache.row_bytes <= state_bytes(full_copy)
    for _, buffer in cache._state(sizes=True):
        buffer.fill_(7)  # every slot overwritten: only the copies know the rows now
    cache.load_row(short.index, clone_state(short_copy))
    cache.load_row(full.index, full_copy)
    assert short.bucket is full.bucket and cache.row_size(full.index) == (16, 256)
    for name, buffer in cache._state(sizes=True):
        if name.startswith(("keys", "values")):  # the short row's unheld slots keep whatever they had
            assert torch.equal(buffer[full.index], before[name][full.index]), name
            held = short_copy["held"][0]
            assert torch.equal(buffer[short.index, :, :held], before[name][short.index, :, :held]), name
        else:  # the bucket's other rows (the spare) are not compared
            for index in (short.index, full.index):
                assert torch.equal(buffer[index], before[name][index]), name


def test_no_decoder_is_built_on_the_hot_path_after_warm_up():
    model = tiny_model(cla_map(4, 2))
    engine = Engine(model, EngineSettings(max_batch=8, prefill_tokens=16))
    conversations = specs()[:4]
    together(engine, conversations, 16)
    warm = (engine.counters.decoders_built, engine.counters.graphs_captured, engine.counters.compiles_started)
    for _ in range(2):
        together(engine, conversations, 16)
    assert (engine.counters.decoders_built, engine.counters.graphs_captured, engine.counters.compiles_started) == warm


@pytest.mark.parametrize("overlap", [False, True])
def test_stopping_one_row_leaves_the_others_untouched(overlap):
    model = tiny_model(cla_map(4, 2))
    engine = Engine(model, EngineSettings(max_batch=4, prefill_tokens=16, overlap_steps=overlap))
    long = SamplingSettings(temperature=0, repetition_penalty=1.0, max_new_tokens=40)
    rows = [engine.open_row(4, 64, seed=i) for i in range(3)]
    stops = [threading.Event() for _ in rows]
    streams = []
    for i, row in enumerate(rows):
        list(engine.prefill(row, [10 + i, 20, 30], 16, threading.Event()))
    for row, stop in zip(rows, stops):
        streams.append(engine.generate(row, long, frozenset(), stop))
    next(iter(streams[1][0]))
    stops[1].set()
    for stream, _ in streams:
        list(stream)
    assert streams[1][0].reason == "stopped" and len(streams[1][1]) < 40
    assert [s[0].reason for s in (streams[0], streams[2])] == ["max_new_tokens", "max_new_tokens"]
    alone = Engine(model, EngineSettings(max_batch=4, prefill_tokens=16))
    for i in (0, 2):
        row = alone.open_row(4, 64, seed=i)
        list(alone.prefill(row, [10 + i, 20, 30], 16, threading.Event()))
        stream, fed = alone.generate(row, long, frozenset(), threading.Event())
        list(stream)
        assert fed == streams[i][1]


def test_snapshot_and_restore_bring_a_row_back_with_its_pending_logits():
    model = tiny_model(cla_map(4, 2))
    engine = Engine(model, EngineSettings(max_batch=2, prefill_tokens=16))
    row = engine.open_row(4, 32, seed=0)
    list(engine.prefill(row, list(range(5, 25)), 16, threading.Event()))
    saved = engine.snapshot(row, with_logits=True)
    first, fed = engine.generate(row, GREEDY, frozenset(), threading.Event())
    list(first)
    engine.restore(row, saved)
    assert row.seen == 20
    again, fed_again = engine.generate(row, GREEDY, frozenset(), threading.Event())
    list(again)
    assert fed_again == fed


def test_a_closed_engine_refuses_work_with_a_message():
    model = tiny_model(cla_map(4, 2))
    engine = Engine(model, EngineSettings(max_batch=1))
    row = engine.open_row(4, 32)
    engine.close()
    with pytest.raises(RuntimeError, match="closed"):
        engine.prefill(row, [1, 2, 3], 16, threading.Event())


@pytest.mark.parametrize("bad", [dict(max_batch=3), dict(bucket_mb=0), dict(prefill_tokens=0)])
def test_bad_engine_settings_are_named(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        EngineSettings(**bad)


def test_a_step_runs_a_larger_compiled_class_rather_than_an_uncompiled_one():
    """On a CPU only some batch classes are compiled: rows that fit a smaller, uncompiled class step
    in the compiled larger one (no eager step, no row swaps); the same tokens either way."""
    model = tiny_model(cla_map(4, 2))
    conversations = specs()[:3]
    plain = Engine(model, EngineSettings(max_batch=8, prefill_tokens=16))
    expected = together(plain, conversations, 16)
    engine = Engine(model, EngineSettings(max_batch=8, prefill_tokens=16))
    bucket = engine._call(lambda: engine._bucket(bucket_shape(conversations[0].sink, conversations[0].window)))
    assert [bucket.step_class(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]  # nothing compiled
    bucket._compiled.update({1: True, 8: True})  # as the side compiler leaves it on a CPU
    assert [bucket.step_class(n) for n in (1, 2, 3, 5, 8)] == [1, 8, 8, 8, 8]
    bucket._compiled[8] = False  # a compile that failed serves nothing
    assert bucket.step_class(3) == 4
    bucket._compiled[8] = True
    steps = []
    original = bucket.step
    bucket.step = lambda size, stepping: steps.append(size) or original(size, stepping)
    got = together(engine, conversations, 16)
    for (replies, logits), (expected_replies, expected_logits) in zip(got, expected):
        assert replies == expected_replies
        assert (logits.float() - expected_logits.float()).abs().max() < 1e-4
    assert 8 in steps and set(steps) <= {1, 8}


def test_compiled_steps_are_kept_beside_the_base_model_unless_a_folder_was_chosen(monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    monkeypatch.setenv("LCKV_STREAM_CACHE", str(tmp_path))
    for before, after in ((None, tmp_path / "inductor"), (default_cache_dir(), tmp_path / "inductor"),
                          ("/srv/compiled", "/srv/compiled")):
        if before is None:
            monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        else:
            monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", before)
        engine_module._persistent_compile_cache()
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(after)
