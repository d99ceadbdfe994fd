"""`torch.ops.lckv.int4_linear`: 4-bit weight products on AVX512-VNNI (int4_kernel.cpp).

A one-token step reads every weight once, so its speed follows the bytes a weight takes. This format
stores a weight in 4 bits with a float16 scale and minimum per group of 32 or 64 inputs of a row
(w ~ scale * q + minimum, q in [0, 15]: llama.cpp's Q4_1), 4.5-5 bits a weight against int8's 8, and
the kernel multiplies the 4-bit weights by 8-bit activations without turning them into floats. It is
built with the int8 kernel (`int8_kernel.py`, one extension) and available where that one is.
"""

from __future__ import annotations

import threading

import torch

from . import int8_kernel

BLOCK = 64  # inputs per activation scale; the nibbles are packed per block of 64
GROUP_SIZES = (32, 64)  # inputs per weight scale and minimum that the kernel takes
# Kernel order of a block of 64 inputs (int4_kernel.cpp): position p holds input ORDER[p], so that
# VNNI lane p // 4 sums inputs of one group of 32 (even lanes the first group, odd the second).
ORDER = torch.tensor([4 * (p // 8) + 32 * ((p // 4) % 2) + p % 4 for p in range(BLOCK)])
_LOCK = threading.Lock()
_registered: list[bool] = []


def available() -> bool:
    """Whether the kernel can run here (builds the CPU kernels on the first call)."""
    if not int8_kernel.available():
        return False
    with _LOCK:
        if not _registered:
            _register_fake()
            _registered.append(True)
    return True


def fits(shape: torch.Size | tuple[int, int], group_size: int) -> bool:
    """Whether the kernel takes a weight of this shape in groups of `group_size`."""
    return group_size in GROUP_SIZES and shape[1] % BLOCK == 0


def _register_fake() -> None:
    """The op's output shape for the compiler (TorchInductor traces it without running it)."""
    @torch.library.register_fake("lckv::int4_linear")
    def _(x, weight, scale, minimum):
        return x.new_empty(x.shape[0], weight.shape[0])


def quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`weight` [N, K] -> (q [N, K] uint8 in [0, 15], scale, minimum [N, K / group_size] float16),
    min-max per group. q is rounded against the float16 scale and minimum the kernel will read."""
    rows, columns = weight.shape
    groups = weight.detach().float().view(rows, columns // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    minimum = low.half()
    scale = ((high - minimum.float()) / 15).half()
    step = scale.float().clamp(min=torch.finfo(torch.float16).tiny)  # a constant group: every q is 0
    q = torch.round((groups - minimum.float()[..., None]) / step[..., None]).clamp(0, 15).to(torch.uint8)
    return q.view(rows, columns), scale, minimum


def pack(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] in [0, 15] -> [N, K / 2] bytes, each block of 64 inputs in kernel order (`ORDER`):
    byte j holds position j in its low nibble and position 32 + j in its high one (what the kernel
    unpacks with one shift)."""
    rows, columns = q.shape
    ordered = q.to(torch.uint8).view(rows, columns // BLOCK, BLOCK)[..., ORDER]
    halves = ordered.view(rows, columns // BLOCK, 2, BLOCK // 2)
    return (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(rows, columns // 2)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of `pack`: [N, K / 2] bytes -> q [N, K] uint8."""
    rows, half = packed.shape
    blocks = packed.view(rows, half // (BLOCK // 2), BLOCK // 2)
    ordered = torch.cat((blocks & 0x0F, blocks >> 4), dim=-1)
    q = torch.empty_like(ordered)
    q[..., ORDER] = ordered
    return q.view(rows, 2 * half)


def dequantize(packed: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor) -> torch.Tensor:
    """The float32 weights [N, K] the kernel multiplies by: scale * q + minimum per group."""
    q = unpack(packed).float()
    rows, columns = q.shape
    groups = q.view(rows, scale.shape[1], -1)
    return (groups * scale.float()[..., None] + minimum.float()[..., None]).view(rows, columns)
