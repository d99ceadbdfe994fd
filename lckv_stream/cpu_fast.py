"""The CPU fast path: the model the engine steps on a CPU (weights quantized, activations and cache
in a compact dtype), torch's threads set to the CPUs really available, and the one-token step
compiled to C++ by TorchInductor.

On a CPU a decode step is a few hundred small operations around matrix products with one row, so
two things decide its speed: how many bytes of weights each token reads (`quantize.py`) and how
much time goes between operations (Python and dispatch, which compiling removes). The engine
compiles the step on its side compiler (one version per cache shape and batch size class, cached
on disk by Inductor) and serves with the eager quantized step until it is ready.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from . import int8_kernel
from .cache import SinkWindowCache
from .decoding import EagerDecoder
from .quantize import QuantizationSettings, quantized_copy

# Weight formats of the fast path. int8: held-out perplexity +0.8-1.0% over float32; int4 (the VNNI
# int4 kernel) costs +5% at best, in the MLP alone, +19% everywhere (bench/RESULTS.md).
CPU_QUANTIZATION = QuantizationSettings("int8")
# Activations and cache. float32: the VNNI kernel quantizes activations itself, and float32 shares
# the embeddings with the float model instead of copying them (bfloat16 measured slower: RESULTS.md).
CPU_DTYPE = torch.float32
# The cache alone in bfloat16: a batched step reads every row's keys and values, half the bytes
# (the decode attention kernel reads bfloat16, computes in float32).
CPU_CACHE_DTYPE = torch.bfloat16
# Batch size classes whose step is compiled (the others: eager). Compiling one takes about 4 minutes
# on two cores (on the side, once: cached on disk); batch 8 compiled ran 1.5x faster than eager
# (62.6 against 93.0 ms a step, bench/cpu_levers.py --batch 8).
CPU_COMPILED_CLASSES = (1, 8)

# TorchInductor options of the compiled CPU step. cpp_wrapper: the code that calls the kernels is
# C++ too, not Python. Not freezing (weights as constants): Inductor's disk cache skips frozen graphs,
# and compiling the default model's step takes minutes on two cores. No guards on the model's modules:
# checking them before every call took 1.1 ms of a 13 ms step (bench/RESULTS.md); a compiled step
# only ever serves the one model it was compiled for, whose modules do not change (the cache, which
# does, keeps its guards).
CPU_COMPILE_OPTIONS: dict = {"cpp_wrapper": True,
                             "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}


def cpu_fast_enabled() -> bool:
    """Whether the CPU fast path is wanted: on unless LCKV_CPU_FAST=0."""
    return os.environ.get("LCKV_CPU_FAST", "1") != "0"


def cpu_quota() -> int | None:
    """CPUs this process may use under a cgroup quota (containers: a Space's 2 vCPUs on a larger
    host), or None without one. The affinity mask there still lists every host CPU."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as file:
            quota, period = file.read().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else max(1, int(quota) // int(period))


def use_cpu_threads() -> int:
    """Torch's threads set to the CPUs really available, unless OMP_NUM_THREADS says otherwise: more
    threads than CPUs leave each parallel region waiting for a thread the OS has not scheduled."""
    if "OMP_NUM_THREADS" not in os.environ:
        available = min(filter(None, (len(os.sched_getaffinity(0)), cpu_quota())))
        if torch.get_num_threads() > available:
            torch.set_num_threads(available)
    return torch.get_num_threads()


def cpu_fast_model(model):
    """The model the CPU fast path steps: weights quantized (`CPU_QUANTIZATION`), activations in
    `CPU_DTYPE`, cache in `CPU_CACHE_DTYPE`; made once per model and kept beside it (the float
    model stays as it is)."""
    fast = model.__dict__.get("_lckv_cpu_fast")
    if fast is None:
        fast = quantized_copy(model, CPU_QUANTIZATION, CPU_DTYPE)
        fast.cache_dtype = CPU_CACHE_DTYPE  # what `new_cache` makes for it
        object.__setattr__(model, "_lckv_cpu_fast", fast)  # not a submodule: its weights are not the model's
    return fast


def fast_path_name() -> str:
    """How the panel names the fast path's steps, e.g. "CPU, int8 VNNI" (the dtype when not float32;
    "+ AMX" where batched products go through AMX)."""
    dtype = "" if CPU_DTYPE == torch.float32 else f", {str(CPU_DTYPE).removeprefix('torch.')}"
    amx = " + AMX" if CPU_QUANTIZATION.weights == "int8" and int8_kernel.amx_in_use() else ""
    return f"CPU, {CPU_QUANTIZATION.label}{amx}{dtype}"


class CompiledCPUDecoder(EagerDecoder):
    """The one-token step through a compiled `decode_step`; prefill eager (its products have as
    many rows as tokens, which spreads the dispatch cost)."""

    def __init__(self, model, cache: SinkWindowCache, step_function: Callable, name: str) -> None:
        super().__init__(model, cache)
        self._function = step_function
        self.name = name

    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self._function(self.model, token_ids.view(-1, 1), self.cache)
