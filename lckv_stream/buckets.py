"""A bucket: one batched sink + window cache of one shape, the rows it lends to conversations, and
the decoders that step it (one per batch size class).

Every conversation's cache is a fixed-size block, so conversations are rows of one buffer and one
captured step serves them all. A row keeps its own sink and window inside the bucket's shape (the
unused slots stay empty and masked), so a few shapes serve every setting: windows rounded up to a
power of two from 256, sinks to a power of two from 16. A step of batch class c (the smallest
class >= the number of generating rows) runs on rows [0, c), so the generating rows are kept there;
rows in that range that do not step are inactive and left untouched by it.

Only the engine's thread calls into a bucket: it owns the device.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from .attention import choose_attention_backend
from .cache import SinkWindowCache
from .cpu_fast import CompiledCPUDecoder
from .cpu_threads import in_passing_thread
from .decoding import (EagerDecoder, GraphDecoder, PREFILL_GRAPH_SIZES, capture, compile_chunk, compile_options_for,
                       compile_step, decode_step, feed_step)
from . import fused_step
from .fusion import fuse_projections
from .sampling import RowSampling, SamplingSettings, sample_rows, seed_hash, width_of

BATCH_CLASSES = (1, 2, 4, 8, 16, 32, 64)
_SAMPLING_FIELDS = {"temperature": torch.float32, "top_p": torch.float32, "repetition_penalty": torch.float32,
                    "seed_hashes": torch.long, "draws": torch.long}
MIN_SINK, MIN_WINDOW = 16, 256
STOP_SLOTS = 8  # stop tokens a generating row may have


def _power_of_two_at_least(value: int, floor: int) -> int:
    size = floor
    while size < value:
        size *= 2
    return size


def bucket_shape(sink: int, window: int) -> tuple[int, int]:
    """The (sink, window) buffer shape that serves a row of this sink and window."""
    return _power_of_two_at_least(sink, MIN_SINK), _power_of_two_at_least(window, MIN_WINDOW)


def queued_copy(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`values` (host) on `device`, queued behind the work in flight. From pageable memory, a copy
    to a GPU first waits for the stream to drain (CUDA's rule), so a read or a new reply arriving
    while a step runs would stall it: the values go through pinned memory instead (torch's pinned
    allocator does not reuse the block until the copy is done)."""
    if device.type != "cuda":
        return values.to(device)
    return values.pin_memory().to(device, non_blocking=True)


def batch_class(rows: int) -> int:
    """The smallest batch size class that holds `rows` rows."""
    return next(size for size in BATCH_CLASSES if size >= rows)


@dataclass
class Counters:
    """Work that must not happen on the hot path once a bucket is warm: counted, so tests can check."""

    decoders_built: int = 0
    graphs_captured: int = 0
    compiles_started: int = 0
    compiles_finished: int = 0
    compile_seconds: float = 0.0


@dataclass
class StepOptions:
    """How a bucket's steps are built on this device."""

    graphs: bool = False  # CUDA graphs for the step, the prefill chunks and the sampler
    compile: bool = False  # compile the step (on the side: plain graphs serve meanwhile)
    prefill_graphs: bool = True
    compile_prefill: bool = True  # with compile and prefill graphs: the chunks compiled on the side too
    # Rows reading messages at the same time are encoded in one call (`Bucket.prefill_rows`). Off,
    # each reads alone, one after another, as it would with no one else there: on a GPU, where the
    # one call (eager, bfloat16, other matrix shapes) gives other tokens than each row's captured
    # chunks would.
    batch_prefill: bool = True
    # A whole step (sampler, model step, bookkeeping) in one graph; off until measured on a GPU.
    whole_step: bool = False
    compiled_classes: tuple[int, ...] | None = None  # None: every class; batch 1 first, then largest
    # The step of the classes it serves (up to fused_step.MAX_ROWS rows) as fused Triton kernels,
    # "persistent" (one launch a step) or "layers" (five a layer), in place of the compiled step; None:
    # off (on an H100 it is slower than the compiled step, bench/RESULTS.md).
    fused_step: str | None = None
    compile_options: dict | None = None  # TorchInductor options (None: decoding.compile_options_for)
    name: str | None = None  # what the eager step is called (the CPU fast path: "CPU, int8")


class Bucket:
    """Rows of one cache shape on one device, with their step decoders and sampler.

    Row `rows` (one past the last lendable row) is a spare: a staging row for captured prefill
    chunks (their graphs have fixed addresses) and the temporary of row swaps.
    """

    def __init__(self, model, sink: int, window: int, rows: int, options: StepOptions,
                 counters: Counters, compiler: "SideCompiler | None" = None) -> None:
        self.model = model
        self.shape = (sink, window)
        self.rows = rows
        self.options = options
        self.counters = counters
        self._compiler = compiler
        self.cache = model.new_cache(sink, window, batch_size=rows + 1)
        choose_attention_backend(self.cache)  # what the row views of batched prefill inherit
        self.spare = rows
        self.occupant: list = [None] * rows  # the engine's Row in each lendable row
        self.classes = tuple(size for size in BATCH_CLASSES if size <= rows)
        vocab = model.config.vocab_size
        self.next_logits = torch.zeros(rows + 1, vocab, dtype=model.dtype, device=self.cache.device)
        self._decoders: dict[int, object] = {}
        self._compiled: dict[int, bool] = {}
        self._samplers: dict[tuple[int, int], tuple] = {}
        # `sample_rows` compiled per (class, width) by the side compiler (captured in `_samplers` on
        # CUDA): a few fused passes over the vocabulary instead of dozens of kernels (on a CPU 6.5
        # against 1.8 ms for 8 rows); eager for other widths.
        self._compiled_samplers: dict[tuple[int, int], Callable] = {}
        self._whole_steps: dict[tuple[int, int], tuple | None] = {}  # (class, width): one graph a step
        self._whole_step_errors: dict[int, str] = {}
        device = self.cache.device
        self._params = RowSampling(**{name: torch.zeros(rows + 1, dtype=dtype, device=device)
                                      for name, dtype in _SAMPLING_FIELDS.items()})
        self._params.top_p.fill_(1.0)
        self._params.repetition_penalty.fill_(1.0)
        self._widths = [vocab] * (rows + 1)  # candidate width of each row's sampling (host copy)
        self._width_of_row = torch.full((rows + 1,), vocab, dtype=torch.long, device=device)
        # Which rows generate, on the device, so that a step can be queued before the host has read
        # the last one's tokens: a row that draws a stop token or reaches its token limit leaves
        # `alive` in the step that ends it, and the next step (already queued) leaves it untouched.
        self._alive = torch.zeros(rows + 1, dtype=torch.bool, device=device)
        self._remaining = torch.zeros(rows + 1, dtype=torch.long, device=device)
        self._stop_table = torch.full((rows + 1, STOP_SLOTS), -1, dtype=torch.long, device=device)
        # The rows the engine steps now (a generating row whose reader lags, or that was stopped,
        # does not): on the device, so that a captured step reads it; written only where it changes.
        self._stepping = torch.zeros(rows + 1, dtype=torch.bool, device=device)
        self._stepping_host = [False] * (rows + 1)
        # On CUDA the mask goes over in one copy from pinned memory, from two buffers in turn: a
        # buffer is written again only after the step that read it has been finished (`_finish`).
        self._stepping_staging = ([torch.zeros(rows + 1, dtype=torch.bool, pin_memory=True) for _ in range(2)]
                                  if device.type == "cuda" else [])
        self._host_tokens: list[torch.Tensor] = []
        self._prefill_decoder = None
        # What failed to compile or install, in full (names carry only the start): for logs and tests.
        self.compile_errors: dict[str, str] = {}
        self.graphs = False  # captured yet (eager until then)
        self.upgrade()
        if options.compile and not options.graphs and compiler is not None:
            self._submit_compiles()  # a CPU: compiled steps are called directly, no graphs

    def upgrade(self) -> bool:
        """Capture the bucket's graphs (steps, prefill chunks, the default sampler) and queue its
        compiles, if wanted and not done yet. A capture must not overlap the side compiler's GPU work:
        while it compiles, the bucket runs eagerly and the engine calls this again later."""
        if not self.options.graphs or self.graphs:
            return True
        lock = self._compiler.lock if self._compiler is not None else None
        if lock is not None and not lock.acquire(blocking=False):
            return False
        try:
            self._capture_graphs()
        finally:
            if lock is not None:
                lock.release()
        return True

    def _capture_graphs(self) -> None:
        model, options, window = self.model, self.options, self.shape[1]
        fuse_projections(model)
        self._prefill_decoder = self._build(
            lambda: GraphDecoder(model, self.cache.rows(self.spare, self.spare + 1),
                                 prefill_graphs=options.prefill_graphs))
        if options.prefill_graphs:  # every chunk size now: no capture later, while a compile runs
            ids = torch.zeros(1, 1, dtype=torch.long, device=self.cache.device)
            for size in PREFILL_GRAPH_SIZES:
                if size <= window:
                    self._prefill_decoder._replay_prefill(ids.expand(1, size))
                    self.counters.graphs_captured += 1
            self.cache.rows(self.spare, self.spare + 1).reset()
        self.graphs = True
        self._decoders.clear()
        self._whole_steps.clear()
        default_width = width_of(SamplingSettings(), self.next_logits.shape[-1])
        for size in self.classes:
            self.decoder(size)
            self._samplers[(size, default_width)] = self._capture_sampler(size, default_width)
            self.counters.graphs_captured += 1
            if options.whole_step:
                self._capture_whole_step(size, default_width)
        if options.compile and self._compiler is not None:
            self._submit_compiles()

    def _submit_compiles(self) -> None:
        # Batch 1 first (one user must not wait), then the largest (the most users served).
        for size in sorted(self.classes, key=lambda size: (size != 1, -size)):
            if self._compiled.get(size):  # served by the fused step
                continue
            if self.options.compiled_classes is None or size in self.options.compiled_classes:
                self._compiler.submit(self, size)
                self.counters.compiles_started += 1
        if self.options.graphs and self.options.prefill_graphs and self.options.compile_prefill:
            self._compiler.submit(self, 0, prefill=True)  # then the prefill chunks: one compile for all sizes
            self.counters.compiles_started += 1

    # ---- rows ---------------------------------------------------------------------------------
    @property
    def row_bytes(self) -> int:
        return self.cache.row_bytes

    def free_rows(self) -> list[int]:
        return [i for i, row in enumerate(self.occupant) if row is None]

    def swap(self, a: int, b: int) -> None:
        """Exchange two rows: their cache state, pending logits and occupants."""
        if a == b:
            return
        cache, spare = self.cache, self.spare
        cache.copy_row(a, spare)
        cache.copy_row(b, a)
        cache.copy_row(spare, b)
        for buffer in (self.next_logits, self._width_of_row, self._alive, self._stepping, self._remaining, self._stop_table,
                       *(getattr(self._params, name) for name in _SAMPLING_FIELDS)):
            buffer[spare].copy_(buffer[a])
            buffer[a].copy_(buffer[b])
            buffer[b].copy_(buffer[spare])
        self._widths[a], self._widths[b] = self._widths[b], self._widths[a]
        self._stepping_host[a], self._stepping_host[b] = self._stepping_host[b], self._stepping_host[a]
        self.occupant[a], self.occupant[b] = self.occupant[b], self.occupant[a]
        for index in (a, b):
            if self.occupant[index] is not None:
                self.occupant[index].index = index

    # ---- decoders -----------------------------------------------------------------------------
    def _build(self, make: Callable):
        self.counters.decoders_built += 1
        decoder = make()
        if isinstance(decoder, GraphDecoder):
            self.counters.graphs_captured += 1
        return decoder

    def decoder(self, size: int):
        """The step decoder for batch class `size` (rows [0, size)), built on first use."""
        if size not in self._decoders:
            view = self.cache.rows(0, size)
            if self.graphs:
                function = self._fused_function(view) or decode_step
                self._decoders[size] = self._build(lambda: GraphDecoder(self.model, view, step_function=function))
                if function is not decode_step:
                    self._compiled[size] = True  # the fused step: nothing to compile for this class
            else:
                self._decoders[size] = self._build(lambda: self._eager(view))
        return self._decoders[size]

    def _fused_function(self, view: SinkWindowCache):
        """The fused step for these rows where it is wanted and serves them, else None."""
        if self.options.fused_step is None or fused_step.fits(self.model, view) is not None:
            return None
        return fused_step.FusedStep(self.model, view, mode=self.options.fused_step)

    def step_class(self, rows: int) -> int:
        """The batch class that a step of `rows` rows runs: the smallest that holds them, unless its
        compiled step is not ready and a larger class's is (on a CPU only some classes are compiled:
        a compiled batch-8 step costs less than an eager batch-2 one, and needs no row swaps)."""
        smallest = batch_class(rows)
        if self._compiled.get(smallest):
            return smallest
        return next((size for size in self.classes if size > smallest and self._compiled.get(size)), smallest)

    def _eager(self, view: SinkWindowCache) -> EagerDecoder:
        decoder = EagerDecoder(self.model, view)
        if self.options.name is not None:
            decoder.name = self.options.name
        return decoder

    def install_compiled(self, size: int, function: Callable, sampler: Callable | None = None) -> None:
        """Replace class `size`'s plain graph (on a CPU: its eager step) with the compiled step, captured
        on CUDA (engine thread); `sampler` (compiled `sample_rows` for the default width) replaces the
        eager sampler of that class."""
        view = self.cache.rows(0, size)
        try:
            # A guard that fails here would compile on the engine's thread: refuse instead.
            with torch.compiler.set_stance("fail_on_recompile"):
                if self.options.graphs:
                    decoder = self._build(lambda: GraphDecoder(self.model, view, step_function=function))
                else:
                    name = f"{self.decoder(size).name}, compiled"
                    decoder = self._build(lambda: CompiledCPUDecoder(self.model, view, function, name))
                    self._check_compiled(decoder)
        except Exception as error:  # keep the plain graph; the name says why
            self.compile_failed(size, str(error))
            return
        self._decoders[size] = decoder
        self._compiled[size] = True
        if sampler is not None:
            self._install_sampler(size, sampler)
        for width in [key[1] for key in self._whole_steps if key[0] == size]:
            self._capture_whole_step(size, width)  # again, around the compiled step

    def install_compiled_prefill(self, function: Callable) -> None:
        """Capture the compiled prefill chunk of every size in place of the plain ones (engine
        thread); where one fails its plain chunk stays, and the prefill decoder's name says why."""
        for size in PREFILL_GRAPH_SIZES:
            if size > self.shape[1]:  # the sizes `_capture_graphs` captured
                continue
            try:
                with torch.compiler.set_stance("fail_on_recompile"):
                    self._prefill_decoder.install_prefill(size, function)
            except Exception as error:
                self.compile_errors[f"{size}-token prefill chunk"] = str(error)
                self._prefill_decoder.name += f" (compiled {size}-token chunk failed: {str(error)[:80]})"
                continue
            self.counters.graphs_captured += 1

    def _install_sampler(self, size: int, sampler: Callable) -> None:
        """Use the compiled sampler for class `size` after one call on the rows' own buffers (a guard
        that fails raises here, not in a reply); the eager one stays where it fails. With graphs, the
        compiled sampler is captured in place of the eager one: a few fused kernels instead of about
        ninety small ones (the noise hash alone is dozens), each a launch gap in every step."""
        width = width_of(SamplingSettings(), self.next_logits.shape[-1])
        try:
            with torch.compiler.set_stance("fail_on_recompile"):
                if self.graphs:
                    graph = self._capture_sampler(size, width, sampler)
                else:
                    self._run_sampler(sampler, size, width)
        except Exception:  # the eager sampler keeps serving
            return
        if self.graphs:
            self._samplers[(size, width)] = graph
            self.counters.graphs_captured += 1
        self._compiled_samplers[(size, width)] = sampler

    def _run_sampler(self, sampler: Callable, size: int, width: int) -> torch.Tensor:
        # Not in inference mode: the tokens feed the compiled step, whose guards expect plain tensors.
        cache = self.cache  # the rows' token ids and which slots hold one, as a view of them would give
        return sampler(self.next_logits[:size], self._row_params(size), width, cache.token_ids[:size],
                       cache.token_index[:size] >= 0)

    def prefill_compile_failed(self, reason: str) -> None:
        """The plain prefill chunks keep serving; the prefill decoder's name says why."""
        self.compile_errors["prefill chunks"] = reason
        self._prefill_decoder.name += f" (compiling the prefill chunks failed: {reason[:80]})"

    def compile_failed(self, size: int, reason: str) -> None:
        """Class `size` keeps its plain graph (or eager step); its name says why."""
        self.compile_errors[f"step of class {size}"] = reason
        self.decoder(size).name += f" (compile failed: {reason[:80]})"
        self._compiled[size] = False

    def _check_compiled(self, decoder: CompiledCPUDecoder) -> None:
        """One call of the compiled step on a copy of the rows' state, put back after: a guard that
        fails on these rows raises here (the stance refuses to compile), not in a reply."""
        cache = decoder.cache
        saved = cache.snapshot()
        try:
            decoder.step(torch.zeros(cache.batch_size, dtype=torch.long, device=cache.device))
        finally:
            cache.restore(saved)

    def decoder_name(self, size: int) -> str:
        name = self.decoder(size).name
        wanted = self.options.compiled_classes is None or size in self.options.compiled_classes
        if size in self._whole_step_errors:
            name += f" (whole-step graph failed: {self._whole_step_errors[size]})"
        elif any(key[0] == size and whole is not None for key, whole in self._whole_steps.items()):
            name += ", one graph a step"
        if self.options.graphs and not self.graphs:
            name += " (graphs wait for the side compiler)"
        elif self.options.compile and wanted and size not in self._compiled:
            name += " (compiling on the side)"
        return name

    # ---- steps --------------------------------------------------------------------------------
    def start_generating(self, index: int, settings: SamplingSettings, seed: int, draws: int,
                         stop_ids: frozenset[int]) -> None:
        """Row `index` generates from the next step on, sampling with `settings` until it draws one of
        `stop_ids` or has drawn `settings.max_new_tokens` tokens (all kept on the device)."""
        if len(stop_ids) > STOP_SLOTS:
            raise ValueError(f"at most {STOP_SLOTS} stop tokens, got {len(stop_ids)}")
        self._stop_table[index].fill_(-1)
        if stop_ids:
            self._stop_table[index, : len(stop_ids)].copy_(queued_copy(torch.tensor(sorted(stop_ids)), self.cache.device))
        self._remaining[index] = settings.max_new_tokens
        self._alive[index] = True
        params = self._params
        params.temperature[index] = settings.temperature
        params.top_p[index] = settings.top_p
        params.repetition_penalty[index] = settings.repetition_penalty
        params.seed_hashes[index] = seed_hash(seed)
        params.draws[index] = draws
        width = width_of(settings, self.next_logits.shape[-1])
        self._widths[index] = width
        self._width_of_row[index] = width

    def host_tokens(self, count: int) -> torch.Tensor:
        """A pinned host buffer for a step's `count` tokens: two, used in turn, since a step's tokens
        are read after the next step is queued (and its copy with it)."""
        if not self._host_tokens:
            self._host_tokens = [torch.empty(self.rows + 1, dtype=torch.long, pin_memory=True) for _ in range(2)]
        self._host_tokens.reverse()
        return self._host_tokens[0][:count]

    def stop_generating(self, index: int) -> None:
        """Row `index` takes no part in the steps queued from now on."""
        self._alive[index] = False

    def step(self, size: int, stepping: list[int]) -> torch.Tensor:
        """One batched decode step of class `size` for the generating rows `stepping` (all < size; the
        other rows up to `size` idle): each row's next token is drawn from its pending logits with
        its own settings (`start_generating`), fed to the cache, and the new logits become pending.
        Returns the tokens drawn [size] (on the device; only the stepping rows' mean anything, and
        not a row's that had stopped generating)."""
        wanted = [False] * (self.rows + 1)
        for index in stepping:
            wanted[index] = True
        if wanted != self._stepping_host:  # one copy when the set changes, whatever changed
            self._stepping_host = wanted
            if self._stepping_staging:
                self._stepping_staging.reverse()
                staging = self._stepping_staging[0]
                staging.copy_(torch.tensor(wanted))
                self._stepping.copy_(staging, non_blocking=True)
            else:
                self._stepping.copy_(torch.tensor(wanted))
        widths = sorted({self._widths[index] for index in stepping})
        whole = self._whole_step(size, widths[0]) if len(widths) == 1 else None
        if whole is not None:
            graph, tokens = whole
            graph.replay()
            return tokens
        decoder = self.decoder(size)
        return self._step_body(size, lambda: self._sample(size, widths), decoder.step)

    def _step_body(self, size: int, sample: Callable[[], torch.Tensor],
                   run_model: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """What a step does on the device, every part with fixed shapes and no host sync (so that it
        can be captured whole): the active rows, their draws, the model, the pending logits and the
        rows that end."""
        active = self.cache.active[:size]
        torch.logical_and(self._alive[:size], self._stepping[:size], out=active)
        tokens = sample()
        stepped = active.long()
        self._params.draws[:size].add_(stepped)
        logits = run_model(tokens)
        pending = self.next_logits[:size]
        pending.copy_(torch.where(active.view(-1, 1), logits, pending))
        remaining = self._remaining[:size]
        remaining.sub_(stepped)
        ended = (tokens.view(-1, 1) == self._stop_table[:size]).any(-1) | (remaining <= 0)
        self._alive[:size].logical_and_(~(ended & active))
        return tokens

    def _whole_step(self, size: int, width: int) -> tuple | None:
        """The whole step of class `size` for rows that all draw among `width` candidates, captured in
        one CUDA graph (the sampler, the model's step and the bookkeeping: one launch instead of a
        graph, a graph and a dozen kernels); None where there are no graphs, or until it can be
        captured (not while the side compiler works)."""
        key = (size, width)
        if key in self._whole_steps:
            return self._whole_steps[key]
        if not (self.graphs and self.options.whole_step):
            return None
        lock = self._compiler.lock if self._compiler is not None else None
        if lock is not None and not lock.acquire(blocking=False):
            return None
        try:
            return self._capture_whole_step(size, width)
        finally:
            if lock is not None:
                lock.release()

    def _capture_whole_step(self, size: int, width: int) -> tuple | None:
        """Capture `_whole_step` (the side compiler idle); None, kept, where it cannot be captured."""
        decoder = self.decoder(size)
        whole = None
        if isinstance(decoder, GraphDecoder):
            # The decoder's own view of the rows: the attention backend was chosen on it.
            view, params, run_model = decoder.cache, self._row_params(size), feed_step(self.model, decoder)
            touched = (self.next_logits, self._params.draws, self._remaining, self._alive, self.cache.active)
            saved = [buffer.clone() for buffer in touched]  # the capture's warm-up really steps
            try:
                # A compiled step whose guard failed here would compile on the engine's thread: refuse.
                stance = "default" if decoder.step_function is decode_step else "fail_on_recompile"
                with torch.inference_mode(), torch.compiler.set_stance(stance):
                    whole = capture(lambda: self._step_body(
                        size, lambda: sample_rows(self.next_logits[:size], params, width, view.token_ids,
                                                  view.token_index >= 0), run_model), view, warmup=1)
                self.counters.graphs_captured += 1
                self._whole_step_errors.pop(size, None)
            except Exception as error:  # the step's own graph and the sampler's still serve; the name says why
                self._whole_step_errors[size] = str(error)[:80] or type(error).__name__
            finally:
                for buffer, copy in zip(touched, saved):
                    buffer.copy_(copy)
        self._whole_steps[(size, width)] = whole
        return whole

    def _sample(self, size: int, widths: list[int]) -> torch.Tensor:
        """Tokens [size] for the rows' pending logits: one pass per candidate width in use."""
        tokens = self._sample_width(size, widths[0])
        for width in widths[1:]:
            chosen = self._width_of_row[:size] == width
            tokens = torch.where(chosen, self._sample_width(size, width), tokens)
        return tokens

    def _row_params(self, size: int) -> RowSampling:
        return RowSampling(**{name: getattr(self._params, name)[:size] for name in _SAMPLING_FIELDS})

    def _sample_width(self, size: int, width: int) -> torch.Tensor:
        if not self.graphs:
            return self._run_sampler(self._compiled_samplers.get((size, width), sample_rows), size, width)
        key = (size, width)
        if key not in self._samplers:
            # A capture must not overlap the side compiler's GPU work: sample eagerly until it is idle.
            lock = self._compiler.lock if self._compiler is not None else None
            if lock is not None and not lock.acquire(blocking=False):
                return self._run_sampler(sample_rows, size, width)
            try:
                self._samplers[key] = self._capture_sampler(size, width)
                self.counters.graphs_captured += 1
            finally:
                if lock is not None:
                    lock.release()
        graph, tokens = self._samplers[key]
        graph.replay()
        return tokens

    def _capture_sampler(self, size: int, width: int, sampler: Callable = sample_rows) -> tuple:
        view, logits, params = self.cache.rows(0, size), self.next_logits[:size], self._row_params(size)
        return capture(lambda: sampler(logits, params, width, view.token_ids, view.token_index >= 0),
                       None, warmup=1)

    @property
    def batches_prefill(self) -> bool:
        """Whether rows that read at the same time share one call (`prefill_rows`)."""
        return self.options.batch_prefill

    def prefill_rows(self, start: int, pieces: list[list[int]], sequential: bool) -> None:
        """Encode pieces[i] into row start + i, all in one call, each row as alone: the shorter ones
        are left-padded (padding is neither seen nor cached). `sequential`: how the model encodes
        each of them alone (`encodes_sequentially`), the same for every piece. Each row's pending
        logits become its last token's."""
        stop, longest = start + len(pieces), max(map(len, pieces))
        ids = torch.zeros(len(pieces), longest, dtype=torch.long)
        mask = torch.zeros(len(pieces), longest, dtype=torch.long)
        for i, piece in enumerate(pieces):
            ids[i, longest - len(piece):] = torch.tensor(piece, dtype=torch.long)
            mask[i, longest - len(piece):] = 1
        self.cache.active[start:stop].fill_(True)  # a one-token call writes through the decode path
        view = self.cache.rows(start, stop)
        with torch.inference_mode():
            logits = self.model(ids.to(view.device), view, logits_to_keep=1, attention_mask=mask.to(view.device),
                                sequential=sequential).logits[:, -1]
        self.next_logits[start:stop].copy_(logits)

    def prefill(self, index: int, token_ids: torch.Tensor) -> None:
        """Encode token_ids [1, T] into row `index`; its pending logits become the last token's."""
        self.cache.active[index].fill_(True)  # fill_, not a host copy: a one-token chunk writes through the decode path
        if self._prefill_decoder is None:  # eager, on a view of the row (no decoder to build per row)
            with torch.inference_mode():
                logits = self.model(token_ids, self.cache.rows(index, index + 1), logits_to_keep=1).logits[:, -1]
        else:  # captured chunks run on the spare row: copy the row in, encode, copy it back
            self.cache.copy_row(index, self.spare)
            logits = self._prefill_decoder.prefill(token_ids)
            self.cache.copy_row(self.spare, index)
        self.next_logits[index].copy_(logits[0])


class SideCompiler:
    """Compiles bucket steps on its own thread while the engine serves with plain CUDA graphs (on a
    CPU: with the eager step).

    A capture on the engine's thread fails if another thread synchronizes the GPU meanwhile, and
    compiling does (autotuning): the compiler holds `lock` while it works, and the engine captures a
    compiled step only when it can take the lock without waiting.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._queue: list[tuple[Bucket, int, bool]] = []  # (bucket, batch class, the prefill chunks instead)
        self._ready: list[tuple[Bucket, int, bool, object, float]] = []
        self._working = 0  # compiles under way (taken from the queue, not ready yet)
        self._installing = 0  # ready compiles the engine's thread is installing now
        self._wake = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, bucket: Bucket, size: int, prefill: bool = False) -> None:
        """Queue the step of batch class `size`, or (`prefill`) the prefill chunks (`size` unused)."""
        with self._wake:
            self._queue.append((bucket, size, prefill))
            self._wake.notify()
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="lckv-side-compiler", daemon=True)
            self._thread.start()

    @property
    def pending(self) -> int:
        """Compiles not installed yet (queued, under way, ready, or being installed)."""
        return len(self._queue) + self._working + len(self._ready) + self._installing

    @property
    def has_ready(self) -> bool:
        return bool(self._ready)

    def _run(self) -> None:
        import time

        while True:
            with self._wake:
                while not self._queue:
                    self._wake.wait()
                bucket, size, prefill = self._queue.pop(0)
                self._working += 1
            started = time.perf_counter()
            compile_one = self._compile_prefill if prefill else self._compile
            with self.lock:  # on a passing thread: this one would keep an OpenMP team (cpu_threads.py)
                function = in_passing_thread(compile_one, bucket, size)
            with self._wake:
                self._ready.append((bucket, size, prefill, function, time.perf_counter() - started))
                self._working -= 1

    def _compile(self, bucket: Bucket, size: int) -> tuple[Callable, Callable | None] | str:
        """Compile the step for `size` rows of the bucket's shape on a scratch cache of that shape,
        and the sampler for the default width too (None where that fails: the eager one serves); the
        error's text when the step fails."""
        try:
            sink, window = bucket.shape
            scratch = bucket.model.new_cache(sink, window, batch_size=size)
            scratch.attention_backend = bucket.decoder(size).cache.attention_backend
            options = bucket.options.compile_options
            function = compile_step(compile_options_for(size) if options is None else options)
            tokens = torch.zeros(size, 1, dtype=torch.long, device=scratch.device)
            with torch.inference_mode():
                for _ in range(2):
                    function(bucket.model, tokens, scratch)
            if scratch.device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as error:  # the plain graph (or eager step) keeps serving
            return str(error) or type(error).__name__
        try:
            return function, _compile_sampler(scratch, size, bucket.next_logits)
        except Exception:  # the eager sampler keeps serving
            return function, None

    def _compile_prefill(self, bucket: Bucket, size: int) -> Callable | str:
        """The prefill chunks for one row of the bucket's shape, compiled once for every chunk length
        on a scratch row (`size` is unused); the error's text where that fails (the plain chunks keep
        serving)."""
        try:
            sink, window = bucket.shape
            scratch = bucket.model.new_cache(sink, window, batch_size=1)
            scratch.attention_backend = bucket.cache.attention_backend  # as the spare row it will run on
            function = compile_chunk()
            with torch.inference_mode():
                for length in (16, 4):  # the length is a symbol from the first call on: no recompile
                    tokens = torch.zeros(1, length, dtype=torch.long, device=scratch.device)
                    torch._dynamo.maybe_mark_dynamic(tokens, 1)
                    function(bucket.model, tokens, scratch)
            if scratch.device.type == "cuda":
                torch.cuda.synchronize()
        except Exception as error:
            return str(error) or type(error).__name__
        return function

    def install_ready(self, counters: Counters) -> None:
        """On the engine thread: capture the compiled steps that are ready, if the compiler is idle."""
        if not self._ready or not self.lock.acquire(blocking=False):
            return
        try:
            with self._wake:
                ready, self._ready = self._ready, []
                self._installing = len(ready)
            for bucket, size, prefill, function, seconds in ready:
                counters.compiles_finished += 1
                counters.compile_seconds += seconds
                if prefill and isinstance(function, str):
                    bucket.prefill_compile_failed(function)
                elif prefill:
                    bucket.install_compiled_prefill(function)
                elif isinstance(function, str):
                    bucket.compile_failed(size, function)
                else:
                    bucket.install_compiled(size, *function)
                self._installing -= 1
        finally:
            self._installing = 0
            self.lock.release()


def _compile_sampler(scratch: SinkWindowCache, size: int, pending_logits: torch.Tensor) -> Callable:
    """`sample_rows` compiled for `size` rows drawing among the default width, on scratch inputs
    shaped like a bucket's (`pending_logits`: the bucket's, for their dtype and width)."""
    sampler = torch.compile(sample_rows, fullgraph=True, dynamic=False)
    vocab = pending_logits.shape[-1]
    width = width_of(SamplingSettings(), vocab)
    # Outside inference mode, as the bucket calls it (its guards check the inputs' kind).
    device = pending_logits.device
    params = RowSampling(**{name: torch.zeros(size, dtype=dtype, device=device) for name, dtype in _SAMPLING_FIELDS.items()})
    logits = torch.zeros(size, vocab, dtype=pending_logits.dtype, device=device)
    sampler(logits, params, width, scratch.token_ids, scratch.token_index >= 0)
    return sampler


@dataclass
class HostCopy:
    """A row's state in host memory (pinned on CUDA): what an offloaded conversation keeps."""

    state: dict[str, torch.Tensor]
    shape: tuple[int, int]
    seen: int
    nbytes: int = field(default=0)
