"""Encoding new tokens into a cache and decoding one token at a time.

`EagerDecoder` runs the model for every call. `GraphDecoder` captures the one-token step once in a
CUDA graph and replays it: the sink + window cache has fixed-size buffers and a one-token step does
no host synchronization, so every step has the same shapes and addresses.
"""

from __future__ import annotations

import os
import threading
from contextlib import nullcontext
from typing import ContextManager, Iterator

import torch

from .cache import SinkWindowCache
from .fusion import fuse_projections
from .sampling import SamplingSettings, candidate_count, sample_next, sample_with_noise


# TorchInductor options of the compiled step. With coordinate-descent tuning on, Inductor writes a
# one-row matrix product (batch 1) as a reduction it fuses with the norm before it and the activation
# after: fewer, fuller kernels than one cuBLAS call per projection (measured in bench/RESULTS.md).
COMPILE_OPTIONS: dict = {"coordinate_descent_tuning": True}


class EagerDecoder:
    """Runs the model directly for every call; works on any device."""

    name = "eager"

    def __init__(self, model, cache: SinkWindowCache) -> None:
        self.model = model
        self.cache = cache

    @torch.inference_mode()
    def prefill(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Encode token_ids [batch, T] into the cache; logits of the last one [batch, vocab]."""
        return self.model(token_ids, self.cache, logits_to_keep=1).logits[:, -1]

    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row [batch]; logits for the next one [batch, vocab]."""
        return self.model(token_ids.view(-1, 1), self.cache, logits_to_keep=1).logits[:, -1]

    @torch.inference_mode()
    def sample_and_step(
        self, logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Choose the next token from `logits` [batch, vocab] (repeats of the tokens the cache holds
        penalized) and append it; returns (token ids [batch], logits for the one after)."""
        cache = self.cache
        token = sample_next(logits, settings, generator, cache.token_ids, cache.token_index >= 0)
        return token, self.step(token)


# Chunk sizes whose prefill is captured in a CUDA graph (with `prefill_graphs`): a turn is encoded
# as the largest of these that fit, the last few tokens through the one-token step.
PREFILL_GRAPH_SIZES = (256, 64, 16, 4)


class GraphDecoder(EagerDecoder):
    """The one-token step captured in a CUDA graph; prefill eager, or (`prefill_graphs`) cut into
    chunks of fixed sizes, each size captured on first use.

    With `compile=True` the step is first compiled (TorchInductor fuses the small elementwise and
    reduction kernels of every layer), then captured: the graph replays the fused kernels.
    """

    def __init__(
        self, model, cache: SinkWindowCache, warmup: int = 3, compile: bool = False,
        compile_options: dict | None = None, prefill_graphs: bool = False,
    ) -> None:
        super().__init__(model, cache)
        if cache.device.type != "cuda":
            raise RuntimeError("CUDA graphs need the model and cache on a CUDA device")
        self.name = ("cuda-graph + compile" if compile else "cuda-graph") + (", prefill graphs" if prefill_graphs else "")
        # Chunks up to the window only: their tokens land in distinct slots (no host sync needed).
        self._prefill_sizes = tuple(size for size in PREFILL_GRAPH_SIZES if size <= cache.window)
        self._prefill_graphs: dict[int, tuple] | None = {} if prefill_graphs else None
        self._pool = None  # one memory pool for the prefill graphs: they never run at the same time
        self._samplers: dict[tuple, tuple] | None = {}  # per sampling settings: noise, graph, token
        self._tokens = torch.zeros(cache.batch_size, 1, dtype=torch.long, device=cache.device)
        options = COMPILE_OPTIONS if compile_options is None else compile_options
        step = torch.compile(self._run, fullgraph=True, dynamic=False, options=options) if compile else self._run
        self.ungraphed_step = step  # the same step run without the graph (profiling)
        with torch.inference_mode():
            self._graph, self._logits = _capture(step, cache, warmup)

    def _run(self) -> torch.Tensor:
        return self.model(self._tokens, self.cache, logits_to_keep=1).logits[:, -1]

    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        self._tokens.copy_(token_ids.view(-1, 1))
        self._graph.replay()
        return self._logits

    @torch.inference_mode()
    def sample_and_step(
        self, logits: torch.Tensor, settings: SamplingSettings, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The sampler replayed from a CUDA graph (one per settings) writing straight into the step
        graph's input: per token, one noise kernel and two graph launches, no host work between."""
        sampler = self._sampler(settings)
        if sampler is None:
            return super().sample_and_step(logits, settings, generator)
        noise, graph, token = sampler
        if logits.data_ptr() != self._logits.data_ptr():  # the first token after a prefill
            self._logits.copy_(logits)
        if noise is not None:
            noise.exponential_(generator=generator)  # outside the graph: the generator's own stream of draws
        graph.replay()
        self._graph.replay()
        return token, self._logits

    def _sampler(self, settings: SamplingSettings) -> tuple | None:
        key = (settings.temperature, settings.top_k, settings.top_p, settings.repetition_penalty)
        return self._captured("_samplers", key, lambda: self._capture_sampler(settings), "sampler")

    def _captured(self, table_name: str, key, capture, label: str) -> tuple | None:
        """The graph under `key` in the table `table_name`, captured on first use (at most 8 kept:
        the oldest goes). A failed capture sets the table to None, so that part runs eagerly from
        then on, and the decoder's name says why."""
        table = getattr(self, table_name)
        if table is None:
            return None
        if key not in table:
            if len(table) >= 8:
                table.pop(next(iter(table)))
            try:
                table[key] = capture()
            except Exception as error:  # capture fails in many ways; the eager path still works
                setattr(self, table_name, None)
                self.name += f" ({label} graph failed: {str(error)[:80]})"
                return None
        return table[key]

    def _capture_sampler(self, settings: SamplingSettings) -> tuple:
        cache, logits = self.cache, self._logits
        noise = None
        if settings.temperature > 0:
            noise = torch.ones(logits.shape[0], candidate_count(settings, logits.shape[-1]), device=logits.device)

        def run() -> torch.Tensor:
            token = sample_with_noise(logits, settings, noise, cache.token_ids, cache.token_index >= 0)
            self._tokens.copy_(token.view(-1, 1))
            return token

        graph, token = _capture(run, cache, warmup=1)
        return noise, graph, token

    @torch.inference_mode()
    def prefill(self, token_ids: torch.Tensor) -> torch.Tensor:
        if self._prefill_graphs is None:
            return super().prefill(token_ids)
        start, total = 0, token_ids.shape[1]
        while start < total:
            size = next((size for size in self._prefill_sizes if size <= total - start), 1)
            piece = token_ids[:, start : start + size]
            logits = self.step(piece[:, 0]) if size == 1 else self._replay_prefill(piece)
            if logits is None:  # capture failed: eager from here on
                return super().prefill(token_ids[:, start:])
            start += size
        return logits.clone()  # the graphs' output buffers are overwritten by the next replay

    def _replay_prefill(self, piece: torch.Tensor) -> torch.Tensor | None:
        size = piece.shape[1]
        captured = self._captured("_prefill_graphs", size, lambda: self._capture_prefill(size), "prefill")
        if captured is None:
            return None
        tokens, graph, logits = captured
        tokens.copy_(piece)
        graph.replay()
        return logits

    def _capture_prefill(self, size: int) -> tuple:
        cache = self.cache
        tokens = torch.zeros(cache.batch_size, size, dtype=torch.long, device=cache.device)
        self._pool = self._pool or torch.cuda.graph_pool_handle()
        graph, logits = _capture(lambda: self.model(tokens, cache, logits_to_keep=1).logits[:, -1], cache,
                                 warmup=1, pool=self._pool)
        return tokens, graph, logits


# Two users at once: while one thread captures a CUDA graph, any host synchronization of the same
# GPU from another thread (a token read, torch.cuda.synchronize, empty_cache) fails and invalidates
# the capture, whatever the capture mode. So GPU work runs under one lock, event by event: sessions
# take turns between the events they stream (the GPU runs their kernels one at a time anyway).
_GPU_LOCK = threading.RLock()


def gpu_lock(device: torch.device) -> ContextManager:
    """Held while doing work on `device` that may synchronize or capture; a no-op off CUDA."""
    return _GPU_LOCK if device.type == "cuda" else nullcontext()


def _capture(run, cache: SinkWindowCache, warmup: int, pool=None) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
    """`run` warmed up on a side stream, then captured in a CUDA graph; returns the graph and its
    output. Warm-up and capture run real calls on the cache: its state is put back afterwards."""
    with _GPU_LOCK:  # also when a decoder is made outside a session's turn
        saved = cache.snapshot()
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
            cache.restore(saved)
    return graph, output


def make_decoder(model, cache: SinkWindowCache, prefer_graph: bool = True, compile: bool | None = None):
    """The fastest decoder that works here: compiled + CUDA graph, CUDA graph, or eager (CPU).

    Compiling takes about two minutes per cache shape on first use (then it is cached on disk);
    `compile=None` reads LCKV_COMPILE (default on; 0 turns it off); prefill is encoded as chunks
    replayed from CUDA graphs unless LCKV_PREFILL_GRAPHS=0. Its `name` says which decoder it is, and
    why a faster one was not used.
    """
    if compile is None:
        compile = os.environ.get("LCKV_COMPILE", "1") != "0"
    if not (prefer_graph and cache.device.type == "cuda"):
        return EagerDecoder(model, cache)
    fuse_projections(model)  # once per model: q/k/v and gate/up as one product each
    prefill_graphs = os.environ.get("LCKV_PREFILL_GRAPHS", "1") != "0"
    failures = []
    for compiled in (True, False) if compile else (False,):
        try:
            decoder = GraphDecoder(model, cache, compile=compiled, prefill_graphs=prefill_graphs)
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
