"""`Engine`: one per model and device, the only owner of its device state; one scheduler thread
decodes every live conversation together.

Each conversation holds a `Row`: a handle to one fixed-size block of a batched cache (a row of a
`Bucket`), or to its copy in host memory while it is idle. Sessions ask for work from their own
threads; the scheduler loop takes it between steps. Each iteration it:
1. runs the commands that arrived (snapshot, restore, reset, resize, close: quick row copies),
2. runs one batched decode step per bucket for every row that is generating (each row sampled
   with its own settings and random stream), and hands each job its token,
3. encodes bounded chunks of the messages rows are reading (rows take turns, each chunk cut as if
   the row were alone; on a CPU the rows reading at once share one call, on a GPU they read one
   after another, one an iteration while rows generate), so a long paste delays the others' tokens
   by one chunk at most,
4. moves rows idle for a while to host memory (restored on their next turn, no re-encoding) and,
   past the host budget, drops the oldest to transcript-only (their owner re-encodes them).
Rows join and leave between steps; Stop ends one row's job at the next step without touching others.
"""

from __future__ import annotations

import collections
import os
import queue
import secrets
import threading
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .buckets import Bucket, Counters, HostCopy, SideCompiler, StepOptions, batch_class, bucket_shape, queued_copy
from .cache import CacheStats, SinkWindowCache, row_stats
from .cpu_fast import (CPU_COMPILE_OPTIONS, CPU_COMPILED_CLASSES, cpu_fast_enabled, cpu_fast_model, fast_path_name,
                       use_cpu_threads)
from .cpu_threads import in_passing_thread
from .fused_step import fused_step_mode
from .host_pool import HostPool
from .packed_state import BLOCK, clone_state, state_bytes
from .sampling import SamplingSettings

MB = 2**20
# A row generates at most this many tokens ahead of its owner: a stalled reader pauses its row
# instead of letting it run to max_new_tokens unseen.
RUN_AHEAD = 16
READER_WAIT_S = 0.0005  # how long the scheduler sleeps when every generating row waits for its reader
# A generating row's owner is woken at most every WAKE_MS_PER_ROW x (rows in the step) ms: with one
# row at every token, with 64 about every 16 ms (its tokens then arrive a few at a time). Waking 64
# owners at every step costs the engine's thread more than a compiled GPU step takes.
WAKE_MS_PER_ROW = 0.25


@dataclass(frozen=True)
class EngineSettings:
    """How much the engine batches and keeps, per device (see `for_device` for the defaults)."""

    max_batch: int = 8  # rows decoded together in one step (the largest batch size class)
    bucket_mb: float = 1024.0  # memory for one cache shape's rows; bigger rows, fewer of them
    host_mb: float = 4096.0  # offloaded rows kept in host memory; past it the oldest are dropped
    idle_seconds: float = float("inf")  # a row with no turn for this long leaves the device
    prefill_tokens: int = 64  # prefill tokens per scheduler iteration while other rows generate
    graphs: bool = False  # CUDA graphs for steps, prefill chunks and the sampler
    compile: bool = False  # compile the steps on the side (plain graphs serve meanwhile)
    warm_shape: tuple[int, int] | None = None  # (sink, window) whose bucket is built at start
    compiled_classes: tuple[int, ...] | None = None  # batch size classes to compile (None: all)
    # Queue each step before reading the last one's tokens (the device never waits for the host's
    # bookkeeping). Pays on a GPU; on a CPU, where the host does the work, it only adds a step at
    # the end of each reply.
    overlap_steps: bool = False
    cpu_fast: bool = False  # on a CPU: steps on a quantized copy of the model (`cpu_fast_model`)

    def __post_init__(self) -> None:
        if self.max_batch not in (1, 2, 4, 8, 16, 32, 64):
            raise ValueError(f"max_batch must be one of 1, 2, 4, 8, 16, 32, 64, got {self.max_batch}")
        if self.bucket_mb <= 0 or self.host_mb < 0 or self.idle_seconds <= 0 or self.prefill_tokens < 1:
            raise ValueError("bucket_mb, idle_seconds and prefill_tokens must be positive and host_mb >= 0")

    @classmethod
    def for_device(cls, device: torch.device, **overrides) -> "EngineSettings":
        """Defaults for `device`; LCKV_MAX_GENERATIONS, LCKV_COMPILE, LCKV_CPU_FAST,
        LCKV_OFFLOAD_IDLE_S and LCKV_HOST_MB override them, keyword arguments override those."""
        cuda = device.type == "cuda"
        cpu_fast = device.type == "cpu" and cpu_fast_enabled()
        values: dict = dict(
            max_batch=64 if cuda else 8, bucket_mb=2048.0 if cuda else 1024.0, host_mb=4096.0,
            idle_seconds=60.0 if cuda else float("inf"), prefill_tokens=256,
            graphs=cuda, compile=(cuda or cpu_fast) and os.environ.get("LCKV_COMPILE", "1") != "0",
            cpu_fast=cpu_fast, compiled_classes=None if cuda else CPU_COMPILED_CLASSES, overlap_steps=cuda,
        )
        if "LCKV_MAX_GENERATIONS" in os.environ:
            values["max_batch"] = batch_class(min(64, max(1, int(os.environ["LCKV_MAX_GENERATIONS"]))))
        if "LCKV_OFFLOAD_IDLE_S" in os.environ:
            values["idle_seconds"] = float(os.environ["LCKV_OFFLOAD_IDLE_S"])
        if "LCKV_HOST_MB" in os.environ:
            values["host_mb"] = float(os.environ["LCKV_HOST_MB"])
        values.update(overrides)
        return cls(**values)


class Row:
    """The engine's record of one conversation's cache: where it lives and what it has seen.

    Only the engine's thread changes it; its owner reads `seen`, `lost` and `residence`.
    """

    def __init__(self, sink: int, window: int, seed: int) -> None:
        self.sink, self.window = sink, window
        self.seed = seed
        self.draws = 0  # random draws so far: the next token's noise is draw number `draws`
        self.seen = 0  # tokens encoded into the cache
        self.bucket: Bucket | None = None
        self.index: int | None = None
        self.host: HostCopy | None = None
        self.lost = False  # dropped to transcript-only (host budget): its owner must re-encode
        self.job = None
        self.last_used = time.monotonic()
        self.closed = False

    @property
    def residence(self) -> str:
        if self.bucket is not None:
            return "device"
        return "host" if self.host is not None else "none"


@dataclass
class RowSnapshot:
    """A copy of a row (host memory) to come back to: undo, regenerate, crash recovery."""

    copy: HostCopy | None  # None: the row was empty
    logits: torch.Tensor | None = None  # pending logits at that point, when asked for


@dataclass
class EngineStats:
    """What the engine holds and does, for the panel and the benchmarks."""

    device: str
    buckets: list[dict]
    rows_on_device: int
    rows_on_host: int
    rows_lost: int
    host_mb: float
    generating: int
    reading: int
    waiting: int
    steps: int
    tokens: int
    compiling: int
    counters: Counters
    held_back: int = 0  # row steps skipped because the row's reader was RUN_AHEAD tokens behind
    host_reserved_mb: float = 0.0  # host memory held for the host copies (pinned slabs on a GPU)


class EngineError(RuntimeError):
    """A job failed in the engine (out of memory, a closed engine...); the message is for users."""


class JobStream:
    """Events of one job from the engine's thread to its owner's: iterate to receive them.

    Waking a waiting owner costs the engine's thread far more than handing it an event (a thread
    switch, and the interpreter lock handed over and back), and with many rows that cost would be
    paid once per row per step. So the engine wakes an owner at most once per `wake_interval`
    seconds while it generates (`put` returns False when it held the wake back; the engine then
    calls `wake_if_due` until it is delivered); a woken owner takes every event waiting. The first
    event and the end are delivered at once."""

    def __init__(self) -> None:
        self._events: collections.deque = collections.deque()
        self._ready = threading.Condition(threading.Lock())
        self._last_wake = 0.0
        self._held = False  # events put that no wake has covered yet
        self.reason: str | None = None  # set when the job ends
        self.error: Exception | None = None
        self._sent = 0
        self._taken = 0

    @property
    def backlog(self) -> int:
        """Events sent that the owner has not taken yet."""
        return self._sent - self._taken

    def put(self, event, now: float | None = None, wake_interval: float = 0.0) -> bool:
        """Hand the owner an event; False when its wake was held back (call `wake_if_due`)."""
        self._sent += 1
        self._events.append(event)
        now = time.perf_counter() if now is None else now
        if self._sent > 1 and now - self._last_wake < wake_interval:
            self._held = True
            return False
        self._wake(now)
        return True

    def wake_if_due(self, now: float, wake_interval: float) -> bool:
        """Deliver held events once the interval has passed; True when nothing is held any more."""
        if not self._held:
            return True
        if now - self._last_wake < wake_interval:
            return False
        self._wake(now)
        return True

    def _wake(self, now: float) -> None:
        self._held = False
        self._last_wake = now
        with self._ready:  # the owner checks for events under this lock before it waits
            self._ready.notify()

    def end(self, reason: str) -> None:
        self.reason = reason
        self._finish()

    def fail(self, error: Exception) -> None:
        self.error = error
        self.reason = "error"
        self._finish()

    def _finish(self) -> None:
        self._events.append(_END)
        with self._ready:
            self._held = False
            self._ready.notify()

    def __iter__(self) -> Iterator:
        while True:
            if not self._events:
                with self._ready:
                    while not self._events:
                        self._ready.wait()
            event = self._events.popleft()
            if event is _END:
                if self.error is not None:
                    raise self.error
                return
            self._taken += 1
            yield event


_END = object()


@dataclass
class _Prefill:
    row: Row
    ids: list[int]
    chunk: int
    stop: threading.Event
    stream: JobStream = field(default_factory=JobStream)
    done: int = 0


@dataclass
class _Generate:
    row: Row
    settings: SamplingSettings
    stop_ids: frozenset[int]
    stop: threading.Event
    stream: JobStream = field(default_factory=JobStream)
    tokens: list[int] = field(default_factory=list)  # every token fed to the cache, final at the end
    last: float = field(default_factory=time.perf_counter)
    in_flight: int = 0  # queued steps that feed this job's row, not read yet


@dataclass
class _Step:
    """A batched step queued on the device: its rows' jobs, in row order, and where its tokens land
    (a pinned host buffer and an event on CUDA; the list itself elsewhere)."""

    jobs: list
    indices: list[int]  # each job's row when the step was queued (a later swap may move it)
    tokens: object
    ready: object


class Engine:
    """The device's one scheduler: batched decode steps, bounded prefill chunks, offloading."""

    def __init__(self, model, settings: EngineSettings | None = None) -> None:
        self.model = model
        self.device = model.device
        self.settings = settings or EngineSettings.for_device(self.device)
        self.counters = Counters()
        cpu_fast = self.settings.cpu_fast and self.device.type == "cpu"
        # What the steps run: the model itself, or its quantized copy on the CPU fast path.
        self.step_model = in_passing_thread(cpu_fast_model, model) if cpu_fast else model
        if cpu_fast:
            use_cpu_threads()
        self._options = StepOptions(graphs=self.settings.graphs, compile=self.settings.compile,
                                    batch_prefill=self.device.type != "cuda",
                                    prefill_graphs=os.environ.get("LCKV_PREFILL_GRAPHS", "1") != "0",
                                    compile_prefill=os.environ.get("LCKV_COMPILE_PREFILL", "1") != "0",
                                    whole_step=os.environ.get("LCKV_WHOLE_STEP_GRAPH", "0") == "1",
                                    compiled_classes=self.settings.compiled_classes,
                                    fused_step=fused_step_mode(),
                                    compile_options=CPU_COMPILE_OPTIONS if cpu_fast else None,
                                    name=fast_path_name() if cpu_fast else None)
        self._compiler = SideCompiler() if self.settings.compile else None
        if self.settings.compile:
            _persistent_compile_cache()
        self._buckets: dict[tuple[int, int], Bucket] = {}
        self._layouts: dict[tuple[int, int], SinkWindowCache] = {}  # per bucket shape, on the meta device
        self._rows: weakref.WeakSet[Row] = weakref.WeakSet()
        self._host_bytes = 0
        # On a GPU, host copies live in pinned slabs (host_pool.py): torch's own pinned blocks
        # would round each copy up to a power of two, up to twice the budget.
        self._host_pool = HostPool() if self.device.type == "cuda" else None
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._prefills: list[_Prefill] = []
        self._waiting: list = []  # jobs that wait for a device row
        # Whether admitting a waiting job could succeed now: a job arrived, or one ended or a row was
        # freed since the last try. Trying drains the queued steps, so it is not done at every step.
        self._admission_changed = False
        self._in_flight: list[_Step] = []  # steps queued on the device whose tokens are not read yet
        self._held: dict[JobStream, float] = {}  # streams whose owner's wake is held back: interval
        self._steps = 0
        self._tokens = 0
        self._held_back = 0
        self._readers_behind = False  # in this iteration, a generating row waited for its reader
        self._last_housekeeping = time.monotonic()
        self._closed = False
        self.started_in_s = 0.0
        self._thread = threading.Thread(target=_serve, args=(weakref.ref(self), self._inbox),
                                        name="lckv-engine", daemon=True)
        self._thread.start()
        if self.settings.warm_shape is not None:
            started = time.perf_counter()
            self._call(lambda: self._bucket(bucket_shape(*self.settings.warm_shape)))
            self.started_in_s = time.perf_counter() - started

    def __deepcopy__(self, memo: dict) -> None:
        """A copy of a model gets no engine: its first session makes one of its own."""
        return None

    @classmethod
    def shared(cls, model) -> "Engine":
        """The engine of `model` (made on first use with the device's defaults)."""
        engine = getattr(model, "_lckv_engine", None)
        if engine is None or engine._closed:
            engine = cls(model)
            object.__setattr__(model, "_lckv_engine", engine)  # not a submodule or parameter
        return engine

    # ---- rows (any thread) --------------------------------------------------------------------
    def open_row(self, sink: int, window: int, seed: int | None = None) -> Row:
        """A new, empty row of this sink and window; `seed` fixes its random stream (default: random)."""
        row = Row(sink, window, secrets.randbits(63) if seed is None else seed)
        self._rows.add(row)
        return row

    def close_row(self, row: Row) -> None:
        """Give the row's memory back (a stream it runs is stopped first)."""
        if not row.closed and not self._closed:
            self._call(lambda: self._close(row))

    def reseed(self, row: Row, seed: int | None) -> None:
        """Restart the row's random stream from `seed` (None: a fresh random one) at its next reply."""
        def apply() -> None:
            self._require_idle(row)
            row.seed, row.draws = secrets.randbits(63) if seed is None else seed, 0

        self._call(apply)

    def release_row(self, row: Row) -> None:
        """`close_row` without waiting for it (from finalizers: any thread, never blocks)."""
        if not row.closed and not self._closed:
            self._inbox.put((lambda: self._close(row), Future()))

    @property
    def dense_bytes_per_token(self) -> int:
        """KV bytes per token of a dense Llama cache of the same model, in the cache's dtype."""
        config = self.model.config
        element = torch.empty((), dtype=self.step_model.dtype).element_size()
        return config.num_hidden_layers * 2 * config.num_key_value_heads * config.head_dim * element

    def resize(self, row: Row, sink: int, window: int) -> None:
        """New sizes for the row; it is emptied (its owner re-encodes what it should hold)."""
        self._call(lambda: self._resize(row, sink, window))

    def reset(self, row: Row) -> None:
        """Empty the row, keeping its sizes."""
        self._call(lambda: self._reset(row))

    def snapshot(self, row: Row, with_logits: bool = False, into: RowSnapshot | None = None) -> RowSnapshot:
        """A host copy of the row (reusing `into`'s buffers when it fits), with its pending logits."""
        return self._call(lambda: self._snapshot(row, with_logits, into))

    def restore(self, row: Row, snapshot: RowSnapshot) -> None:
        """Put the row back as `snapshot` has it (pending logits included when it has them)."""
        self._call(lambda: self._restore(row, snapshot))

    def held_indices(self, row: Row) -> list[int]:
        """Stream indices of the tokens the row holds, in stream order."""
        return self._call(lambda: self._held_indices(row))

    def make_resident(self, row: Row) -> float:
        """Bring the row to the device now (from host memory, or empty); returns the seconds the
        engine's thread spent on it. Turns do this themselves: this is for warming and measuring."""
        def bring() -> float:
            started = time.perf_counter()
            if not self._make_resident(row):
                raise EngineError("every device row of this cache shape is busy")
            if self.device.type == "cuda":
                torch.cuda.current_stream(self.device).synchronize()
            row.last_used = time.monotonic()
            return time.perf_counter() - started

        return self._call(bring)

    def row_stats(self, row: Row) -> CacheStats:
        """The row's cache numbers, from the host's knowledge alone (no device work, any thread)."""
        return row_stats(_RowAccounting(self._layout(bucket_shape(row.sink, row.window)), row), 0, row.seen)

    def _layout(self, shape: tuple[int, int]) -> SinkWindowCache:
        """A cache of this bucket shape on the meta device (nothing allocated): what its rows hold and cost."""
        layout = self._layouts.get(shape)
        if layout is None:
            layout = self._layouts[shape] = self.step_model.new_cache(*shape, device="meta")
        return layout

    def decoder_name(self, row: Row) -> str:
        """The step that serves the row now (its batch size class while it generates)."""
        bucket = row.bucket or self._buckets.get(bucket_shape(row.sink, row.window))
        if bucket is None:
            return self._options.name or ("eager" if not self.settings.graphs else "cuda-graph (not built yet)")
        generating = sum(1 for r in bucket.occupant if r is not None and isinstance(r.job, _Generate))
        return bucket.decoder_name(bucket.step_class(max(1, min(generating, bucket.rows))))

    # ---- jobs (any thread) --------------------------------------------------------------------
    def prefill(self, row: Row, token_ids: list[int], chunk: int, stop: threading.Event) -> JobStream:
        """Encode `token_ids` into the row, at most `chunk` per event (done counts); the stream ends
        with reason "done", or "stopped" when `stop` was set before the end (what was encoded stays)."""
        job = _Prefill(row, list(token_ids), chunk, stop)
        if not job.ids:
            job.stream.end("done")
            return job.stream
        self._submit(job)
        return job.stream

    def generate(self, row: Row, settings: SamplingSettings, stop_ids: frozenset[int],
                 stop: threading.Event) -> tuple[JobStream, list[int]]:
        """Generate from the row's pending logits: events (token id, ms since the row's previous
        token); reasons "eos", "max_new_tokens", "stopped". Returns the stream and the list of every
        token fed to the cache (complete once the stream has ended)."""
        job = _Generate(row, settings, frozenset(stop_ids), stop)
        self._submit(job)
        return job.stream, job.tokens

    # ---- the engine as a whole ----------------------------------------------------------------
    def stats(self) -> EngineStats:
        rows = list(self._rows)
        buckets = [{"sink": shape[0], "window": shape[1], "rows": bucket.rows,
                    "rows_used": sum(r is not None for r in bucket.occupant),
                    "mb": bucket.rows * bucket.row_bytes / MB} for shape, bucket in list(self._buckets.items())]
        return EngineStats(
            device=str(self.device), buckets=buckets,
            rows_on_device=sum(r.residence == "device" for r in rows),
            rows_on_host=sum(r.residence == "host" for r in rows),
            rows_lost=sum(r.lost for r in rows), host_mb=self._host_bytes / MB,
            host_reserved_mb=(self._host_pool.reserved_bytes if self._host_pool else self._host_bytes) / MB,
            generating=sum(isinstance(r.job, _Generate) for r in rows),
            reading=len(self._prefills), waiting=len(self._waiting),
            steps=self._steps, tokens=self._tokens,
            compiling=self._compiler.pending if self._compiler else 0, counters=self.counters,
            held_back=self._held_back,
        )

    def close(self) -> None:
        """Stop the scheduler; running jobs end with an error."""
        if not self._closed:
            self._call(self._shutdown)

    # ---- plumbing -----------------------------------------------------------------------------
    def _submit(self, job) -> None:
        if self._closed:
            raise EngineError("the engine is closed")
        self._inbox.put(job)

    def _call(self, function: Callable):
        """Run `function` on the engine's thread between steps and return its result."""
        if threading.current_thread() is self._thread:
            return function()
        if self._closed:
            raise EngineError("the engine is closed")
        future: Future = Future()
        self._inbox.put((function, future))
        return future.result()

    def _iteration(self, block: bool) -> None:
        """One pass of the scheduler loop (the engine's thread only)."""
        self._receive(block)
        if self._compiler is not None and (self._compiler.has_ready or not all(
                bucket.graphs for bucket in self._buckets.values())):
            self._finish_all()  # a capture wants an idle device
            self._compiler.install_ready(self.counters)
            for bucket in list(self._buckets.values()):
                bucket.upgrade()
        if self._waiting and self._admission_changed:
            self._admission_changed = False
            self._admit_waiting()
        queued = self._in_flight
        self._readers_behind = False
        self._in_flight = [step for step in map(self._launch, list(self._buckets.values())) if step is not None]
        # Every generating row waits for its reader and nothing else is to do: spinning here would
        # only keep the readers' threads from the interpreter.
        stepped = bool(self._in_flight)
        idle = not stepped and self._readers_behind and not self._prefills
        for step in queued:
            self._finish(step)
        if not self.settings.overlap_steps:
            self._finish_all()
        self._prefill_chunk(stepped)
        if time.monotonic() - self._last_housekeeping > 1.0:
            self._finish_all()
            self._housekeeping()
        if self._held:
            now = time.perf_counter()
            self._held = {stream: interval for stream, interval in self._held.items()
                          if not stream.wake_if_due(now, interval)}
        if idle:
            time.sleep(READER_WAIT_S)

    def _busy(self) -> bool:
        return bool(self._in_flight or self._prefills or self._waiting or self._held or any(isinstance(r.job, _Generate) for r in list(self._rows)))

    def _receive(self, block: bool) -> None:
        try:
            item = self._inbox.get(timeout=0.5) if block else self._inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._take(item)
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return

    def _take(self, item) -> None:
        if isinstance(item, tuple):
            function, future = item
            self._finish_all()  # a command sees every step's tokens handed out
            self._admission_changed = True  # it may have freed or moved rows
            try:
                future.set_result(function())
            except BaseException as error:  # handed to the caller's thread
                future.set_exception(error)
        elif self._closed:
            item.stream.fail(EngineError("the engine is closed"))
        else:
            self._waiting.append(item)
            self._admission_changed = True

    # ---- residency ----------------------------------------------------------------------------
    def _bucket(self, shape: tuple[int, int]) -> Bucket:
        if shape not in self._buckets:
            sink, window = shape
            fit = int(self.settings.bucket_mb * MB // self._layout(shape).row_bytes)
            rows = 1
            while rows * 2 <= min(fit, self.settings.max_batch):
                rows *= 2
            self._buckets[shape] = Bucket(self.step_model, sink, window, rows, self._options, self.counters,
                                          self._compiler)
        return self._buckets[shape]

    def _make_resident(self, row: Row) -> bool:
        """Give the row a device row of its bucket (restoring its host copy); False when every row
        of that bucket is busy."""
        if row.bucket is not None:
            return True  # the common case, a row's next turn: nothing moves, so no wait for the device
        self._finish_all()  # rows may move or leave: every queued step read first
        bucket = self._bucket(bucket_shape(row.sink, row.window))
        free = bucket.free_rows()
        if not free:
            idle = [r for r in bucket.occupant if r is not None and r.job is None]
            if not idle:
                return False
            self._offload(min(idle, key=lambda r: r.last_used))
            free = bucket.free_rows()
        index = free[0]
        bucket.occupant[index] = row
        row.bucket, row.index = bucket, index
        if row.host is not None:
            bucket.cache.load_row(index, row.host.state)
            self._forget_host_copy(row)  # its pages are reused only after this copy has run
        else:
            bucket.cache.set_row_size(index, row.sink, row.window)
            row.seen = 0
        return True

    def _offload(self, row: Row) -> None:
        """Copy a device row to host memory and free it."""
        bucket, index = row.bucket, row.index
        pool = self._host_pool
        state = bucket.cache.row_state(index, pin=self.device.type == "cuda",
                                       allocate=pool.allocate if pool is not None else None)
        self._keep_host_copy(row, HostCopy(state, bucket.shape, row.seen))
        self._free_device_row(row)
        self._enforce_host_budget()

    def _keep_host_copy(self, row: Row, copy: HostCopy) -> None:
        """The row's state lives in host memory now (`copy`'s block from the pool where there is one)."""
        pool = self._host_pool
        copy.nbytes = pool.footprint(copy.state[BLOCK]) if pool is not None else state_bytes(copy.state)
        row.host = copy
        self._host_bytes += copy.nbytes

    def _forget_host_copy(self, row: Row) -> None:
        """Drop the row's host copy, if it has one (its block back to the pool)."""
        if row.host is None:
            return
        self._host_bytes -= row.host.nbytes
        if self._host_pool is not None:
            self._host_pool.free(row.host.state[BLOCK])
        row.host = None

    def _free_device_row(self, row: Row) -> None:
        self._admission_changed = True
        if row.bucket is not None:
            row.bucket.occupant[row.index] = None
            row.bucket, row.index = None, None

    def _enforce_host_budget(self) -> None:
        """Past the host budget, the longest-idle host copies are dropped: their owners re-encode."""
        budget = self.settings.host_mb * MB
        while self._host_bytes > budget:
            hosted = [r for r in list(self._rows) if r.host is not None]
            if not hosted:
                return
            oldest = min(hosted, key=lambda r: r.last_used)
            self._forget_host_copy(oldest)
            oldest.seen, oldest.lost = 0, True

    def _housekeeping(self) -> None:
        self._last_housekeeping = now = time.monotonic()
        for row in list(self._rows):
            if row.bucket is not None and row.job is None and now - row.last_used > self.settings.idle_seconds:
                self._offload(row)

    # ---- commands (engine thread) ---------------------------------------------------------------
    def _close(self, row: Row) -> None:
        if row.job is not None:
            row.job.stop.set()
            row.closed = True  # its job ends at the next step and frees the row then
            return
        self._free_device_row(row)
        self._forget_host_copy(row)
        row.closed = True
        self._rows.discard(row)

    def _resize(self, row: Row, sink: int, window: int) -> None:
        self._require_idle(row)
        if bucket_shape(sink, window) != bucket_shape(row.sink, row.window):
            self._free_device_row(row)
        row.sink, row.window = sink, window
        self._reset(row)

    def _reset(self, row: Row) -> None:
        self._require_idle(row)
        self._forget_host_copy(row)
        if row.bucket is not None:
            row.bucket.cache.set_row_size(row.index, row.sink, row.window)
        row.seen, row.lost = 0, False
        row.last_used = time.monotonic()

    def _snapshot(self, row: Row, with_logits: bool, into: RowSnapshot | None) -> RowSnapshot:
        self._require_idle(row)
        logits = None
        if row.bucket is not None:
            bucket = row.bucket
            reuse = into.copy.state if into is not None and into.copy is not None and into.copy.shape == bucket.shape else None
            state = bucket.cache.row_state(row.index, into=reuse, pin=self.device.type == "cuda",
                                           allocate=self._snapshot_block if self._host_pool is not None else None)
            copy = HostCopy(state, bucket.shape, row.seen, state_bytes(state))
            if with_logits:
                logits = bucket.next_logits[row.index].to("cpu", copy=True)
        elif row.host is not None:
            nbytes = state_bytes(row.host.state)
            copy = HostCopy(clone_state(row.host.state, into=self._snapshot_block(nbytes)), row.host.shape, row.seen, nbytes)
        else:
            copy = None
        return RowSnapshot(copy, logits)

    def _snapshot_block(self, nbytes: int) -> torch.Tensor | None:
        """A new block for a snapshot: from the pool on a GPU (None elsewhere: a tensor of its own).
        Its owner drops a snapshot on any thread, so the pages go back through a finalizer when no
        snapshot holds the block any more (a snapshot taken `into` another shares its block)."""
        pool = self._host_pool
        if pool is None:
            return None
        block = pool.allocate(nbytes)
        weakref.finalize(block, pool.give_back_later, block.data_ptr())
        return block

    def _restore(self, row: Row, snapshot: RowSnapshot) -> None:
        self._require_idle(row)
        copy = snapshot.copy
        if copy is None:
            self._reset(row)
            return
        if copy.shape != bucket_shape(row.sink, row.window):
            raise ValueError("the snapshot was taken with other cache sizes")
        if row.bucket is not None:
            row.bucket.cache.load_row(row.index, copy.state)
            if snapshot.logits is not None:
                row.bucket.next_logits[row.index].copy_(snapshot.logits)
        else:
            self._forget_host_copy(row)
            pool = self._host_pool
            block = pool.allocate(state_bytes(copy.state)) if pool is not None else None
            self._keep_host_copy(row, HostCopy(clone_state(copy.state, into=block), copy.shape, copy.seen))
            if snapshot.logits is not None:  # pending logits need the device row
                self._make_resident(row)
                row.bucket.next_logits[row.index].copy_(snapshot.logits)
        row.seen, row.lost = copy.seen, False
        row.last_used = time.monotonic()

    def _held_indices(self, row: Row) -> list[int]:
        if row.bucket is not None:
            return row.bucket.cache.held_indices(row.index)
        if row.host is not None:
            return sorted(i for i in row.host.state["token_index"][0].tolist() if i >= 0)
        return []

    def _require_idle(self, row: Row) -> None:
        if row.job is not None:
            raise EngineError("the row is busy with a job")

    def _shutdown(self) -> None:
        self._closed = True
        for job in self._prefills + self._waiting:
            job.stream.fail(EngineError("the engine was closed"))
        for row in list(self._rows):
            if row.job is not None:
                row.job.stream.fail(EngineError("the engine was closed"))
                row.job = None
        self._prefills, self._waiting = [], []

    # ---- jobs (engine thread) -----------------------------------------------------------------
    def _admit_waiting(self) -> None:
        """Jobs start once their row is on the device (in arrival order)."""
        still = []
        for job in self._waiting:
            row = job.row
            if row.closed or row.job is not None:
                job.stream.fail(EngineError("the row is closed" if row.closed else "the row is busy with a job"))
                continue
            try:
                resident = self._make_resident(row)
            except torch.OutOfMemoryError as error:
                _release_cached_memory()
                job.stream.fail(EngineError("out of memory while making room for this conversation"))
                continue
            if not resident:
                still.append(job)
                continue
            row.job = job
            row.last_used = time.monotonic()
            if isinstance(job, _Prefill):
                self._prefills.append(job)
            else:
                row.bucket.start_generating(row.index, job.settings, row.seed, row.draws, job.stop_ids)
                job.last = time.perf_counter()
        self._waiting = still

    def _end(self, job, reason: str | None = None, error: Exception | None = None) -> None:
        row = job.row
        self._admission_changed = True
        if isinstance(job, _Generate) and row.bucket is not None:
            row.bucket.stop_generating(row.index)
        row.job = None
        row.last_used = time.monotonic()
        if error is not None:
            job.stream.fail(error)
        else:
            job.stream.end(reason)
        if row.closed:
            self._close(row)

    def _launch(self, bucket: Bucket) -> "_Step | None":
        """Queue one batched step of the bucket's generating rows; its tokens are read later
        (`_finish`), once the next step is queued behind it, so the device never waits for the host's
        bookkeeping. A row that ends in a step (stop token, token limit) is left out of the steps
        queued behind it on the device itself (Bucket.step)."""
        jobs = [r.job for r in bucket.occupant if r is not None and isinstance(r.job, _Generate)]
        for job in jobs:  # a job whose owner left: stop it now, whatever its backlog
            if job.stop.is_set() and job.tokens and not job.in_flight:
                self._end(job, "stopped")
        # A stopped job takes no new step; the one in flight still counts (its token is in the cache).
        jobs = [job for job in jobs if job.row.job is job and not job.stop.is_set()]
        ready = [job for job in jobs if job.stream.backlog < RUN_AHEAD]
        self._held_back += len(jobs) - len(ready)
        self._readers_behind |= len(ready) < len(jobs)
        jobs = ready
        if not jobs:
            return None
        size = bucket.step_class(len(jobs))
        # A step of class c runs rows [0, c): a row past it trades places with one that does not step.
        stepping = {id(job.row) for job in jobs}
        for job in jobs:
            if job.row.index >= size:
                target = next(i for i in range(size) if id(bucket.occupant[i]) not in stepping)
                bucket.swap(job.row.index, target)
        jobs.sort(key=lambda job: job.row.index)
        indices = [job.row.index for job in jobs]
        try:
            tokens = bucket.step(size, indices)
            if self.device.type == "cuda":
                host = bucket.host_tokens(size)
                host.copy_(tokens, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record()
                step = _Step(jobs, indices, host, ready)
            else:
                step = _Step(jobs, indices, tokens.tolist(), None)
        except torch.OutOfMemoryError:
            _release_cached_memory()
            self._fail_step(jobs, EngineError("out of memory while generating"))
            return None
        except Exception as error:  # a failed step fails its jobs, not the engine
            self._fail_step(jobs, EngineError(f"decoding failed: {error}"))
            return None
        for job in jobs:
            job.in_flight += 1
        return step

    def _fail_step(self, jobs: list, error: EngineError) -> None:
        for job in jobs:
            if job.row.job is job:
                job.in_flight = 0
                self._end(job, error=error)

    def _finish(self, step: "_Step") -> None:
        """Hand each row of a queued step its token, and end the jobs that ended in it."""
        if step.ready is not None:
            try:
                step.ready.synchronize()
                tokens = step.tokens.tolist()
            except Exception as error:
                self._fail_step(step.jobs, EngineError(f"decoding failed: {error}"))
                return
        else:
            tokens = step.tokens
        now = time.perf_counter()
        self._steps += 1
        interval = WAKE_MS_PER_ROW * 1e-3 * len(step.jobs)
        for job, index in zip(step.jobs, step.indices):
            token = tokens[index]
            job.in_flight -= 1
            if job.row.job is not job:  # ended in an earlier step: this row was not stepped
                continue
            self._tokens += 1
            row = job.row
            row.seen += 1
            row.draws += 1
            job.tokens.append(token)
            if not job.stream.put((token, (now - job.last) * 1e3), now, interval):
                self._held[job.stream] = interval
            job.last = now
            if token in job.stop_ids:
                self._end(job, "eos")
            elif len(job.tokens) >= job.settings.max_new_tokens:
                self._end(job, "max_new_tokens")
            elif job.stop.is_set() and not job.in_flight:
                self._end(job, "stopped")

    def _finish_all(self) -> None:
        """Read every queued step (before anything that moves, copies or frees rows)."""
        while self._in_flight:
            self._finish(self._in_flight.pop(0))

    def _prefill_chunk(self, stepped: bool) -> None:
        """Encode the next chunks of the messages rows are reading, up to `prefill_tokens` in all, so
        that the others' next token is not held up long. Each row's chunk is cut the same way
        whatever else runs (iterated layer maps depend on the cuts). Where the bucket batches
        prefill, the rows next to the first one in line that read a chunk of the same kind join it
        in one call; elsewhere the rows in line read one after another, and only one in an
        iteration that `stepped` (queued a decode step)."""
        if not self._prefills:
            return
        first = self._prefills[0]
        if first.row.bucket.batches_prefill:
            self._read(self._prefill_group(first))
            return
        budget = self.settings.prefill_tokens  # each alone, in line, while the budget lasts
        while True:
            budget -= self._prefill_take(first)
            self._read([first])
            # A read alone costs a whole forward pass however short its chunk (on a GPU about one
            # step for a few tokens): with rows generating, one read an iteration, or short messages
            # arriving together would hold every generating row for the sum of their reads.
            if stepped or not self._prefills or self._prefill_take(self._prefills[0]) > budget:
                return
            first = self._prefills[0]

    def _read(self, group: list[_Prefill]) -> None:
        """Encode the next chunk of each job in `group` (adjacent rows of one bucket: one call)."""
        first = group[0]
        takes = [self._prefill_take(job) for job in group]
        bucket, start = first.row.bucket, first.row.index
        try:
            if len(group) == 1:
                piece = torch.tensor([first.ids[first.done : first.done + takes[0]]], dtype=torch.long)
                bucket.prefill(first.row.index, queued_copy(piece, self.device))
            else:
                pieces = [job.ids[job.done : job.done + take] for job, take in zip(group, takes)]
                bucket.prefill_rows(start, pieces, self.step_model.encodes_sequentially(takes[0]))
        except torch.OutOfMemoryError:
            _release_cached_memory()
            failure = EngineError("out of memory while reading the message")
        except Exception as error:
            failure = EngineError(f"reading the message failed: {error}")
        else:
            failure = None
        taken = {id(job) for job in group}
        self._prefills = [job for job in self._prefills if id(job) not in taken]
        for job, take in zip(group, takes):
            if failure is not None:
                self._end(job, error=failure)
                continue
            job.done += take
            job.row.seen += take
            job.stream.put(job.done)
            if job.done == len(job.ids):
                self._end(job, "done")
            elif job.stop.is_set():
                self._end(job, "stopped")
            else:
                self._prefills.append(job)  # rows reading a message take turns, chunk by chunk

    def _prefill_take(self, job: _Prefill) -> int:
        return min(job.chunk, self.settings.prefill_tokens, len(job.ids) - job.done)

    def _prefill_kind(self, job: _Prefill) -> tuple[bool, bool]:
        """What decides how a chunk is encoded alone: token by token or not, and one token (the
        decode path) or more. Only chunks of one kind share a call, so each is encoded as alone."""
        take = self._prefill_take(job)
        return self.step_model.encodes_sequentially(take), take == 1

    def _prefill_group(self, first: _Prefill) -> list[_Prefill]:
        """`first` and the reading rows of adjacent indices in its bucket whose chunk is of its kind,
        in row order, while their chunks fit in `prefill_tokens` (first always)."""
        bucket, kind = first.row.bucket, self._prefill_kind(first)
        reading = {job.row.index: job for job in self._prefills
                   if job.row.bucket is bucket and self._prefill_kind(job) == kind}
        budget = max(self.settings.prefill_tokens, self._prefill_take(first)) - self._prefill_take(first)
        low = high = first.row.index
        for step in (1, -1):  # rows after the first one, then before it
            index = first.row.index + step
            while index in reading and self._prefill_take(reading[index]) <= budget:
                budget -= self._prefill_take(reading[index])
                low, high = min(low, index), max(high, index)
                index += step
        return [reading[index] for index in range(low, high + 1)]


def _serve(engine_ref: Callable[[], Engine | None], inbox: queue.SimpleQueue) -> None:
    """The scheduler thread: holds the engine only while it works, so an unused engine is freed."""
    while True:
        engine = engine_ref()
        if engine is None or engine._closed:
            return
        try:
            engine._iteration(block=not engine._busy())
        except Exception:  # never let the thread die: a job it was running failed above
            import traceback

            traceback.print_exc()
        del engine


def _release_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _persistent_compile_cache() -> None:
    """Compiled steps and autotuning results on disk, next to the base model: a restart is fast."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from .base_model import cache_dir

    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # Importing torch._inductor writes its default (a folder under /tmp) into the environment: that
    # is no one's choice, and /tmp does not outlast a restart of the machine.
    if chosen is None or chosen == default_cache_dir():
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor")


class _RowAccounting:
    """What `row_stats` reads, for one row: its bucket's layout with the row's own sizes."""

    def __init__(self, layout: SinkWindowCache, row: Row) -> None:
        self._layout = layout
        self._size = (row.sink, row.window)

    def __getattr__(self, name: str):
        return getattr(self._layout, name)

    def row_size(self, row: int = 0) -> tuple[int, int]:
        return self._size
