"""Encoding new tokens into a cache and decoding one token at a time, for every row of a cache.

`EagerDecoder` runs the model for every call. `GraphDecoder` captures the one-token step once in a
CUDA graph and replays it: the sink + window cache has fixed-size buffers and a one-token step does
no host synchronization, so every step has the same shapes and addresses. A decoder may serve a
view over the first rows of a larger cache (`SinkWindowCache.rows`): the engine keeps one decoder
per batch size over one buffer.
"""

from __future__ import annotations

import itertools
import os
import types
from typing import Callable, Iterator

import torch

from .attention import choose_attention_backend
from .cache import SinkWindowCache
from .fusion import fuse_projections


# TorchInductor options of the compiled step. With coordinate-descent tuning on, Inductor writes a
# one-row matrix product (batch 1) as a reduction it fuses with the norm before it and the activation
# after: fewer, fuller kernels than one cuBLAS call per projection (measured in bench/RESULTS.md).
COMPILE_OPTIONS: dict = {"coordinate_descent_tuning": True}
# With more rows the products go to cuBLAS whatever the options; tuning the other kernels made a
# compile 40% longer (115 against 80 s at batch 1), for every batch size class.
BATCHED_COMPILE_OPTIONS: dict = {}


def compile_options_for(batch: int) -> dict:
    """The TorchInductor options of the step for `batch` rows."""
    return COMPILE_OPTIONS if batch == 1 else BATCHED_COMPILE_OPTIONS


def decode_step(model, token_ids: torch.Tensor, cache: SinkWindowCache) -> torch.Tensor:
    """The one hot function: append one token per row [batch, 1]; logits for the next [batch, vocab].

    The cache is an argument (not a closure), so one compiled version serves every cache of the
    same shapes: a scratch copy while compiling on the side, then the engine's own rows."""
    return model(token_ids, cache, logits_to_keep=1).logits[:, -1]


_PRIVATE_COPIES = itertools.count()


def compile_step(options: dict | None = None) -> Callable:
    """`decode_step` compiled by TorchInductor for fixed shapes (compiles on first call per shape)."""
    _allow_recompiles()
    options = COMPILE_OPTIONS if options is None else options
    # Dynamo keeps compiled versions per code object, for every caller of that code. Compiled
    # without guards on the model's modules, a version made for one model could run for another
    # model's call of the same shapes; a private copy of the code keeps this step's versions its own.
    function = _private_copy(decode_step) if "guard_filter_fn" in options else decode_step
    # a copy: torch.compile takes guard_filter_fn out of the dict it is given
    return torch.compile(function, fullgraph=True, dynamic=False, options=dict(options))


def compile_chunk() -> Callable:
    """`decode_step` compiled for prefill chunks of any length (2 tokens or more: one compile serves
    every chunk size, each then captured in its own graph; mark the first call's token length
    dynamic with `torch._dynamo.maybe_mark_dynamic(token_ids, 1)`). On a private copy of its code:
    Dynamo's record of which sizes changed between calls is per code object too, and the steps'
    fixed-shape versions (one per batch size) must not make the chunk's batch size a symbol."""
    _allow_recompiles()
    return torch.compile(_private_copy(decode_step), fullgraph=True, dynamic=None,
                         options=dict(BATCHED_COMPILE_OPTIONS))


def _private_copy(function: Callable) -> Callable:
    """`function` with its own copy of its code (named apart: Python may hand back an equal code
    object it already holds), so that what Dynamo keeps per code object is this copy's alone."""
    name = f"{function.__name__}_{next(_PRIVATE_COPIES)}"
    return types.FunctionType(function.__code__.replace(co_name=name), function.__globals__, name)


def _allow_recompiles() -> None:
    """One compiled version per (cache shape, batch size): far more than Dynamo's default limit of 8
    per function, whose overflow would silently fall back to the uncompiled step."""
    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), 256))
    if hasattr(config, "accumulated_recompile_limit"):
        config.accumulated_recompile_limit = max(config.accumulated_recompile_limit, 4096)


class EagerDecoder:
    """Runs the model directly for every call; works on any device."""

    name = "eager"

    def __init__(self, model, cache: SinkWindowCache) -> None:
        self.model = model
        self.cache = cache
        choose_attention_backend(cache)

    @torch.inference_mode()
    def prefill(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Encode token_ids [batch, T] into the cache; logits of the last one [batch, vocab]."""
        return self.model(token_ids, self.cache, logits_to_keep=1).logits[:, -1]

    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row [batch]; logits for the next one [batch, vocab]."""
        return decode_step(self.model, token_ids.view(-1, 1), self.cache)


# Chunk sizes whose prefill is captured in a CUDA graph (with `prefill_graphs`): a turn is encoded
# as the largest of these that fit, the last few tokens through the one-token step.
PREFILL_GRAPH_SIZES = (256, 64, 16, 4)


class GraphDecoder(EagerDecoder):
    """The one-token step captured in a CUDA graph; prefill eager, or (`prefill_graphs`) cut into
    chunks of fixed sizes, each size captured on first use.

    `step_function` is what gets captured: `decode_step`, or a compiled version of it
    (`compile_step()`: TorchInductor fuses the small elementwise and reduction kernels of every
    layer); `compile=True` compiles here.
    """

    def __init__(
        self, model, cache: SinkWindowCache, warmup: int = 3, compile: bool = False,
        compile_options: dict | None = None, prefill_graphs: bool = False,
        step_function: Callable | None = None,
    ) -> None:
        super().__init__(model, cache)
        if cache.device.type != "cuda":
            raise RuntimeError("CUDA graphs need the model and cache on a CUDA device")
        if step_function is None:
            step_function = compile_step(compile_options) if compile else decode_step
        kind = getattr(step_function, "name", None) or ("compile" if step_function is not decode_step else None)
        self.step_function = step_function  # what the graph runs: a caller may capture it in a larger graph
        self.name = f"cuda-graph{f' + {kind}' if kind else ''}" + (", prefill graphs" if prefill_graphs else "")
        self._prefill_graphs: dict[int, tuple] | None = {} if prefill_graphs else None
        self._pool = None  # one memory pool for the prefill graphs: they never run at the same time
        self._tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.device)
        self.ungraphed_step = lambda: step_function(model, self._tokens, cache)  # profiling
        with torch.inference_mode():
            self._graph, self._logits = capture(self.ungraphed_step, cache, warmup)

    @property
    def step_input(self) -> torch.Tensor:
        """The token ids [batch, 1] the step graph reads: whoever writes them here feeds the step."""
        return self._tokens

    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Replay the step; `token_ids` [batch] are copied in first (None: already in `step_input`).
        The logits buffer is overwritten by the next replay."""
        if token_ids is not None:
            self._tokens.copy_(token_ids.view(-1, 1))
        self._graph.replay()
        return self._logits

    @torch.inference_mode()
    def prefill(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self._prefill_graphs is None:
            return super().prefill(token_ids)
        # Chunks up to the smallest row window only: their tokens land in distinct slots (no host sync).
        sizes = tuple(size for size in PREFILL_GRAPH_SIZES if size <= self.cache.smallest_window())
        start, total = 0, token_ids.shape[1]
        while start < total:
            size = next((size for size in sizes if size <= total - start), 1)
            piece = token_ids[:, start : start + size]
            logits = self.step(piece[:, 0]) if size == 1 else self._replay_prefill(piece)
            if logits is None:  # capture failed: eager from here on
                return super().prefill(token_ids[:, start:])
            start += size
        return logits.clone()  # the graphs' output buffers are overwritten by the next replay

    def _replay_prefill(self, piece: torch.Tensor) -> torch.Tensor | None:
        size = piece.shape[1]
        if self._prefill_graphs is None:
            return None
        if size not in self._prefill_graphs:
            try:
                self._prefill_graphs[size] = self._capture_prefill(size)
            except Exception as error:  # capture fails in many ways; the eager path still works
                self._prefill_graphs = None
                self.name += f" (prefill graph failed: {str(error)[:80]})"
                return None
        tokens, graph, logits = self._prefill_graphs[size]
        tokens.copy_(piece)
        graph.replay()
        return logits

    def _capture_prefill(self, size: int, function: Callable = decode_step) -> tuple:
        cache = self.cache
        tokens = torch.zeros(cache.batch_size, size, dtype=torch.long, device=cache.device)
        self._pool = self._pool or torch.cuda.graph_pool_handle()
        graph, logits = capture(lambda: function(self.model, tokens, cache), cache, warmup=1, pool=self._pool)
        return tokens, graph, logits

    @torch.inference_mode()
    def install_prefill(self, size: int, function: Callable) -> None:
        """Capture `function` (`decode_step` compiled for chunks, `compile_chunk`) in place of the
        plain chunk of `size` tokens. Uncompiled, a chunk replays about as many kernels as the plain
        step (some 1,200 for the default model: 6 ms for 16 tokens on an H200), each a launch gap;
        compiled, a few hundred. Raises where the capture fails (the plain chunk stays)."""
        if self._prefill_graphs is None:
            raise RuntimeError("this decoder has no prefill graphs")
        self._prefill_graphs[size] = self._capture_prefill(size, function)
        if ", compiled prefill" not in self.name:
            self.name += ", compiled prefill"


def feed_step(model, decoder) -> Callable[[torch.Tensor], torch.Tensor]:
    """`decoder`'s step function as a call from token ids [batch] to logits, for a larger graph to
    capture: the tokens are copied into the decoder's own input buffer first, since a compiled
    step's guards expect the tensor it was compiled with (made outside inference mode, where the
    tokens drawn in a step are not), and a guard that fails would compile again."""
    function, cache, fed = decoder.step_function, decoder.cache, decoder.step_input

    def run(token_ids: torch.Tensor) -> torch.Tensor:
        fed.copy_(token_ids.view(-1, 1))
        return function(model, fed, cache)

    return run


def capture(run, cache: SinkWindowCache | None, warmup: int, pool=None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """`run` warmed up on a side stream, then captured in a CUDA graph; returns the graph and its
    output. Warm-up and capture run real calls on the cache: its state is put back afterwards.

    Nothing else may synchronize this GPU while a capture runs (another thread's host sync fails
    it): the engine's one thread does all GPU work, and its side compiler waits meanwhile."""
    saved = cache.snapshot() if cache is not None else None
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # Its own stream: torch.cuda.graph otherwise captures on one stream shared by every caller.
        with torch.cuda.graph(graph, pool=pool, stream=torch.cuda.Stream(), capture_error_mode="thread_local"):
            output = run()
    finally:
        if saved is not None:
            cache.restore(saved)
    return graph, output


def make_decoder(model, cache: SinkWindowCache, prefer_graph: bool = True, compile: bool | None = None,
                 prefill_graphs: bool | None = None, step_function: Callable | None = None):
    """The fastest decoder that works here: compiled + CUDA graph, CUDA graph, or eager (CPU).

    Compiling takes about two minutes per cache shape and batch size on first use (then it is cached
    on disk); `compile=None` reads LCKV_COMPILE (default on; 0 turns it off); prefill is encoded as
    chunks replayed from CUDA graphs unless LCKV_PREFILL_GRAPHS=0 (or `prefill_graphs=False`). Pass
    an already compiled `step_function` to capture it. Its `name` says which decoder it is, and why a
    faster one was not used.
    """
    if compile is None:
        compile = os.environ.get("LCKV_COMPILE", "1") != "0"
    if not (prefer_graph and cache.device.type == "cuda"):
        return EagerDecoder(model, cache)
    fuse_projections(model)  # once per model: q/k/v and gate/up as one product each
    if prefill_graphs is None:
        prefill_graphs = os.environ.get("LCKV_PREFILL_GRAPHS", "1") != "0"
    failures = []
    attempts = [step_function] if step_function is not None else []
    attempts += ["compile"] if compile and step_function is None else []
    attempts += [decode_step]
    for attempt in attempts:
        compiled = attempt is not decode_step
        try:
            function = compile_step() if attempt == "compile" else attempt
            decoder = GraphDecoder(model, cache, prefill_graphs=prefill_graphs, step_function=function)
        except Exception as error:  # compilers and capture fail in many ways; a slower path still works
            failures.append(f"{'compile' if compiled else 'graph capture'} failed: {str(error)[:80]}")
            continue
        if failures:
            decoder.name += f" ({failures[0]})"
        return decoder
    decoder = EagerDecoder(model, cache)
    decoder.name = f"eager ({'; '.join(failures)})"
    return decoder


def prefill_in_chunks(
    decoder, token_ids: list[int], chunk: int, device: torch.device
) -> Iterator[tuple[int, torch.Tensor]]:
    """Encode a long token list in chunks; yields (tokens done, logits of the last token so far)."""
    for start in range(0, len(token_ids), chunk):
        piece = torch.tensor([token_ids[start : start + chunk]], dtype=torch.long, device=device)
        yield min(start + chunk, len(token_ids)), decoder.prefill(piece)
