"""Compiling the fused step's Triton kernels for a Hopper GPU (sm_90) on a machine without one: the
step runs on CPU tensors with its launches recorded instead of run, and each recorded launch is
compiled by Triton's real compiler (front end, LLVM and ptxas) from its argument types. Catches what
the interpreter lets through (a variable whose type differs between branches, a wrong constexpr).
Run in a process without TRITON_INTERPRET: Triton picks the interpreter when functions are defined."""

from __future__ import annotations

import torch

TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64",
         torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "i1"}


def _signature(fn, args: tuple, kwargs: dict) -> tuple[dict, dict]:
    """Triton's type string for each argument of `fn`, and the values of its constexprs."""
    values = dict(zip(fn.arg_names, args), **kwargs)
    signature, constants = {}, {}
    for index, name in enumerate(fn.arg_names):
        value = values[name]
        if fn.params[index].is_constexpr:
            signature[name], constants[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: no Triton type for {name}={value!r}")
    return signature, constants


def compile_fused_step_for_hopper(layer_types, mode: str, sizes, dtype=torch.bfloat16, **shape) -> list[str]:
    """Record the launches of one fused step on a small model (`shape`: config overrides, e.g. the
    default model's widths), compile each kernel for sm_90; returns the names of the kernels
    compiled (each kernel once per distinct signature)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fused_reference import MAPS, tiny_fused_model
    from lckv_stream import fused_step

    # The CPU has no bfloat16 products fast enough to matter here; the step only records launches.
    model = tiny_fused_model(MAPS.get(layer_types, layer_types), dtype, "cpu", **shape)
    cache = model.new_cache(max(s for s, _ in sizes), max(w for _, w in sizes), batch_size=len(sizes))
    launches = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.fn, args, kwargs))

    kernels = [name for name in dir(fused_step) if name.startswith("_") and name.endswith(("_kernel", "_step"))
               and isinstance(getattr(fused_step, name), triton.runtime.JITFunction)]
    originals = {name: getattr(fused_step, name) for name in kernels}
    try:
        for name in kernels:
            setattr(fused_step, name, Recorder(originals[name]))
        step = fused_step.FusedStep(model, cache, mode=mode, programs=4)
        with torch.inference_mode():
            step(model, torch.zeros(len(sizes), 1, dtype=torch.long), cache)
    finally:
        for name, original in originals.items():
            setattr(fused_step, name, original)
    compiled, seen = [], set()
    for fn, args, kwargs in launches:
        signature, constants = _signature(fn, args, kwargs)
        key = (fn.__name__, tuple(signature.items()), tuple(sorted(constants.items(), key=str)))
        if key in seen:
            continue
        seen.add(key)
        triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32),
                       options={"num_warps": 4})
        compiled.append(fn.__name__)
    return compiled
