"""A row's state packed into one byte block, so that it moves between device and host in one copy.

A cache row is about seventy buffers (keys, values and sink keys per producer layer, then the
stream indices and sizes), and only part of each is held early in a conversation. Copied one by
one, each part is a strided copy between host and device, which torch stages through contiguous
temporaries (on the host side, unpinned memory). Laid out one after another in one block instead
(each part contiguous there), the device gathers the parts into a block of its own and the block
crosses to pinned host memory as a single asynchronous copy; coming back, the reverse.
"""

from __future__ import annotations

import math

import torch

ALIGN = 64  # bytes: every part starts on a boundary that any dtype's view accepts
BLOCK = "block"  # the key of the byte block in a packed state; every other entry is a view into it

Spec = tuple[str, tuple[int, ...], torch.dtype]


def packed_bytes(specs: list[Spec]) -> int:
    """Bytes of a block holding these parts."""
    return sum(_aligned(math.prod(shape) * dtype.itemsize) for _, shape, dtype in specs)


def carve(block: torch.Tensor, specs: list[Spec]) -> dict[str, torch.Tensor]:
    """Views of a byte block as contiguous tensors of these names, shapes and dtypes, in order."""
    views, offset = {}, 0
    for name, shape, dtype in specs:
        size = math.prod(shape) * dtype.itemsize
        views[name] = block[offset:offset + size].view(dtype).view(shape)
        offset += _aligned(size)
    if offset > block.numel():
        raise ValueError(f"a block of {block.numel()} bytes cannot hold {offset} bytes of parts")
    return views


def specs_of(state: dict[str, torch.Tensor]) -> list[Spec]:
    """The parts of a packed state, in their order in its block."""
    return [(name, tuple(view.shape), view.dtype) for name, view in state.items() if name != BLOCK]


def state_bytes(state: dict[str, torch.Tensor]) -> int:
    """Host bytes a packed state holds."""
    return state[BLOCK].numel()


def clone_state(state: dict[str, torch.Tensor], into: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """An independent copy of a packed state (pinned where it was), in block `into` when given (as
    many bytes as the state's block)."""
    block = state[BLOCK]
    copy = torch.empty(block.numel(), dtype=torch.uint8, pin_memory=block.is_pinned()) if into is None else into
    copy.copy_(block)
    views = carve(copy, specs_of(state))
    views[BLOCK] = copy
    return views


def _aligned(size: int) -> int:
    return -(-size // ALIGN) * ALIGN
