"""`torch.ops.lckv.int8_linear`: int8 weight products on AVX512-VNNI (int8_kernel.cpp); built with it
into one extension, `torch.ops.lckv.decode_attention`: one token's attention (decode_attention.cpp).

Torch's own int8 weight-only kernel turns every weight back into a float before multiplying, which
on a CPU costs more than reading it: a one-token step of the default model spends most of its time
there. This kernel quantizes the activations too (8 bits per block of 64, scaled per block) and
multiplies bytes by bytes, 64 products an instruction, which leaves the step bound by reading the
weights. It is built once with the C++ compiler torch's extensions use (about a minute; cached in
the model cache folder) on CPUs that have AVX512-VNNI, and is absent elsewhere (`available()`).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
from pathlib import Path

import torch

BLOCK = 64  # inputs per activation scale (one VNNI instruction)
SOURCES = ("int8_kernel.cpp", "int4_kernel.cpp", "decode_attention.cpp")  # built together into one extension
_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")
_LOCK = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool, "error": why it is not available


def cpu_supports_vnni() -> bool:
    """Whether this CPU has the AVX512 instructions the kernel uses (Linux: /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    flags = set(line.split(":", 1)[-1].split())
    return all(flag in flags for flag in _FLAGS)


def available() -> bool:
    """Whether the kernel can run here; builds and loads it on the first call."""
    with _LOCK:
        if "ok" not in _state:
            _state["ok"], _state["error"] = _load()
        return bool(_state["ok"])


def unavailable_reason() -> str | None:
    """Why `available()` is False (None when it is True or was not asked yet)."""
    return None if _state.get("ok", True) else str(_state.get("error"))


def _load() -> tuple[bool, str | None]:
    if not cpu_supports_vnni():
        return False, "the CPU has no AVX512-VNNI"
    try:
        from torch.utils import cpp_extension

        from .base_model import cache_dir

        sources = [Path(__file__).with_name(name) for name in SOURCES]
        # One folder per version of the sources: a changed kernel is built anew, never mixed up with
        # an older build (or with another checkout's).
        digest = hashlib.sha256(b"".join(source.read_bytes() for source in sources)).hexdigest()[:12]
        build = cache_dir() / "kernels" / f"cpu-kernels-{digest}-torch{torch.__version__.replace('+', '_')}"
        build.mkdir(parents=True, exist_ok=True)
        flags = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni", "-mfma", "-fopenmp"]
        with _build_lock(build):
            cpp_extension.load(
                name=f"lckv_cpu_kernels_{digest}", sources=[str(source) for source in sources],
                extra_cflags=flags, extra_ldflags=["-fopenmp"], build_directory=str(build),
                is_python_module=False, verbose=False,
            )
    except Exception as error:  # no compiler or ninja (a slim container): torch's kernel serves
        return False, f"the kernel could not be built: {str(error)[:200]}"
    _register_fake()
    _state["amx"] = bool(torch.ops.lckv.int8_use_amx(os.environ.get("LCKV_INT8_AMX", "1") != "0"))
    return True, None


@contextlib.contextmanager
def _build_lock(build: Path):
    """Holds an OS lock on the build folder while torch builds in it. torch marks a build with a
    `lock` file that a killed process (Ctrl-C during the first start) leaves behind, and every later
    start would wait on it forever; the OS lock dies with its process, so a `lock` file found while
    holding it is such a leftover and goes."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: torch's own file lock alone
        yield
        return
    with open(build / "build.flock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (build / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def use_amx(on: bool) -> bool:
    """Whether products of several rows go through AMX (Sapphire Rapids and later) instead of VNNI:
    asks for `on` and returns what holds now (False where the CPU or the OS has no AMX). Both paths
    give the same floats; LCKV_INT8_AMX=0 starts with AMX off."""
    if not available():
        return False
    _state["amx"] = bool(torch.ops.lckv.int8_use_amx(on))
    return bool(_state["amx"])


def amx_in_use() -> bool:
    """Whether products of several rows go through AMX now (see `use_amx`)."""
    return available() and bool(_state.get("amx"))


def _register_fake() -> None:
    """The ops' output shapes for the compiler (TorchInductor traces them without running them)."""
    @torch.library.register_fake("lckv::int8_linear")
    def _(x, weight, scale, block_sums, out_features):
        return x.new_empty(x.shape[0], out_features)

    @torch.library.register_fake("lckv::decode_attention")
    def _(query, keys, values, visible, sink_keys=None, sink_cos=None, sink_sin=None):
        return torch.empty_like(query, memory_format=torch.contiguous_format)


ROW_GROUP = 16  # weight rows the kernel takes at a time (one int32 lane each)


def pack(qweight: torch.Tensor) -> torch.Tensor:
    """int8 weights [N, K] in the kernel's layout [N / 16, K / 4, 16, 4]: 16 rows at a time, 4 inputs
    of each side by side (N padded with zero rows to a multiple of 16)."""
    rows, columns = qweight.shape
    padded = torch.nn.functional.pad(qweight, (0, 0, 0, -rows % ROW_GROUP))
    return padded.view(-1, ROW_GROUP, columns // 4, 4).permute(0, 2, 1, 3).contiguous()


def unpack(packed: torch.Tensor, rows: int) -> torch.Tensor:
    """`pack`'s input back: [N, K] int8."""
    groups, fours = packed.shape[:2]
    return packed.permute(0, 2, 1, 3).reshape(groups * ROW_GROUP, fours * 4)[:rows]


def block_sums(qweight: torch.Tensor) -> torch.Tensor:
    """-128 x the sum of each block of 64 weights, [N / 16, K / 64, 16] int32 (rows padded as in
    `pack`): where each block's integer sums start, so that the unsigned activation offset cancels."""
    rows, columns = qweight.shape
    sums = -128 * qweight.view(rows, columns // BLOCK, BLOCK).sum(-1, dtype=torch.int32)
    sums = torch.nn.functional.pad(sums, (0, 0, 0, -rows % ROW_GROUP))
    return sums.view(-1, ROW_GROUP, columns // BLOCK).transpose(1, 2).contiguous()


def padded_scale(scale: torch.Tensor) -> torch.Tensor:
    """The rows' scales [N] padded as in `pack` (float32)."""
    return torch.nn.functional.pad(scale.float(), (0, -scale.numel() % ROW_GROUP))


DECODE_ATTENTION_TYPES = (torch.float32, torch.bfloat16)  # of the keys and values
DECODE_ATTENTION_ROWS = 4  # query heads per KV head, at most
DECODE_ATTENTION_DIMS = (16, 32, 64, 128)  # head sizes compiled in


def decode_attention_fits(rows: int, dim: int) -> bool:
    """Whether `decode_attention` takes a folded one-token query [batch, kv_heads, rows, dim] (rows:
    query heads per KV head)."""
    return rows <= DECODE_ATTENTION_ROWS and dim in DECODE_ATTENTION_DIMS


def fits(in_features: int) -> bool:
    """Whether the kernel takes a weight with this many inputs (whole blocks of 64)."""
    return in_features % BLOCK == 0
