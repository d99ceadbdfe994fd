"""Pinned host memory for what a GPU engine keeps on the host (the rows it parks there, and the
undo/regenerate snapshots of the rows), carved from large slabs.

torch's pinned allocator rounds every block up to a power of two and keeps what is freed for
reuse at that size: a whole row of the default model packs into 16.1 MiB and would take 32, so
a host budget of 4 GB would pin up to 8. The pool pins slabs whose sizes are powers of two (no
rounding lost) and hands out runs of small pages inside them: a copy takes what it holds, rounded
up to a page. A freed run becomes free again only once the copies queued before its release have
run (a CUDA event), so a new copy's host-side writes never race a transfer still reading it. A
slab that empties is given back (one empty slab is kept for the next copy).
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import torch

MIB = 2**20


@dataclass(eq=False)  # slabs are told apart by identity
class _Slab:
    memory: torch.Tensor  # uint8, pinned
    pages: bytearray  # 1 where a page is taken (free pages are 0: a run is found with bytes.find)
    taken: int = 0


@dataclass
class _Release:
    slab: _Slab
    first: int
    count: int
    event: object = None  # a recorded torch.cuda.Event, or None when nothing can be in flight


@dataclass(eq=False)
class HostPool:
    """Blocks of pinned host memory (`pin=False`: ordinary memory, for tests on a CPU)."""

    slab_bytes: int = 128 * MIB  # seven whole rows of the default model (16.1 MiB each), 12% left over
    page_bytes: int = 64 * 1024
    pin: bool = True
    _slabs: list[_Slab] = field(default_factory=list)
    _owners: dict[int, tuple[_Slab, int, int]] = field(default_factory=dict)  # block address -> run
    _releases: list[_Release] = field(default_factory=list)
    # Addresses of blocks given back from other threads (finalizers of snapshots): a deque's append
    # is safe from any thread; the owner's thread frees them at its next allocation.
    _given_back: collections.deque = field(default_factory=collections.deque)

    def __post_init__(self) -> None:
        for name in ("slab_bytes", "page_bytes"):
            value = getattr(self, name)
            if value <= 0 or value & (value - 1):
                raise ValueError(f"{name} must be a power of two, got {value}")
        if self.page_bytes > self.slab_bytes:
            raise ValueError("a page cannot be larger than a slab")

    def allocate(self, nbytes: int) -> torch.Tensor:
        """A block of exactly `nbytes` bytes (uint8; its pages are the pool's until `free`)."""
        count = max(1, -(-nbytes // self.page_bytes))
        self._reap(wait=False)
        found = self._find(count)
        if found is None and self._releases:  # wait for queued copies rather than pin more
            self._reap(wait=True)
            found = self._find(count)
        if found is None:
            found = self._grow(count)
        slab, first = found
        slab.pages[first:first + count] = b"\1" * count
        slab.taken += count
        start = first * self.page_bytes
        block = slab.memory[start:start + nbytes]
        self._owners[block.data_ptr()] = (slab, first, count)
        return block

    def free(self, block: torch.Tensor) -> None:
        """Give a block back; its pages are reused once the device work queued so far has run."""
        self._free_address(block.data_ptr())

    def give_back_later(self, address: int) -> None:
        """From any thread (a finalizer): the block at `address` is freed at the next allocation."""
        self._given_back.append(address)

    def _free_address(self, address: int) -> None:
        slab, first, count = self._owners.pop(address)
        event = None
        if self.pin and torch.cuda.is_available():
            event = torch.cuda.Event()
            event.record()
        self._releases.append(_Release(slab, first, count, event))

    def settle(self) -> None:
        """Free every released run now, waiting for the copies queued before its release."""
        self._reap(wait=True)

    def footprint(self, block: torch.Tensor) -> int:
        """Bytes the block takes in the pool (whole pages)."""
        return self._owners[block.data_ptr()][2] * self.page_bytes

    @property
    def used_bytes(self) -> int:
        """Pages taken, including freed ones whose queued copies have not run yet."""
        return sum(slab.taken for slab in self._slabs) * self.page_bytes

    @property
    def reserved_bytes(self) -> int:
        """Host memory the pool holds (its slabs)."""
        return sum(slab.memory.numel() for slab in self._slabs)

    def _find(self, count: int) -> tuple[_Slab, int] | None:
        """The first run of `count` free pages, fullest slab first (emptier slabs can empty out)."""
        wanted = bytes(count)
        for slab in sorted(self._slabs, key=lambda s: -s.taken):
            first = slab.pages.find(wanted)
            if first >= 0:
                return slab, first
        return None

    def _grow(self, count: int) -> tuple[_Slab, int]:
        size = self.slab_bytes
        while size < count * self.page_bytes:  # a power of two: the pinned allocator adds nothing
            size *= 2
        memory = torch.empty(size, dtype=torch.uint8, pin_memory=self.pin)
        slab = _Slab(memory, bytearray(size // self.page_bytes))
        self._slabs.append(slab)
        return slab, 0

    def _reap(self, wait: bool) -> None:
        """Free the released runs whose copies have run (`wait`: all of them, waiting if need be)."""
        while self._given_back:
            self._free_address(self._given_back.popleft())
        pending = []
        for release in self._releases:
            if release.event is not None and not wait and not release.event.query():
                pending.append(release)
                continue
            if release.event is not None and wait:
                release.event.synchronize()
            release.slab.pages[release.first:release.first + release.count] = bytes(release.count)
            release.slab.taken -= release.count
        self._releases = pending
        empty = [slab for slab in self._slabs if slab.taken == 0]
        if len(empty) > 1:  # one empty slab stays for the next copy
            self._slabs = [slab for slab in self._slabs if slab.taken or slab is empty[0]]
