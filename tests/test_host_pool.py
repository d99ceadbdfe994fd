"""The pool of host memory that offloaded rows live in on a GPU (here with ordinary memory)."""

from itertools import pairwise

import pytest
import torch

from lckv_stream.host_pool import HostPool

KIB = 1024


def pool(**kwargs) -> HostPool:
    return HostPool(**{"slab_bytes": 64 * KIB, "page_bytes": 4 * KIB, "pin": False, **kwargs})


def test_blocks_are_exact_disjoint_and_keep_their_bytes_while_others_come_and_go():
    host = pool()
    sizes = [5000, 4096, 1, 20000, 30000, 8191]
    blocks = [host.allocate(size) for size in sizes]
    assert [block.numel() for block in blocks] == sizes
    for value, block in enumerate(blocks):
        block.fill_(value)
    spans = sorted((b.data_ptr(), b.data_ptr() + host.footprint(b)) for b in blocks)
    assert all(end <= start for (_, end), (start, _) in pairwise(spans))  # no two share a page
    host.free(blocks[1])
    host.free(blocks[3])
    for block in [host.allocate(4096), host.allocate(12000)]:  # into the freed pages
        block.fill_(99)
    for value, block in enumerate(blocks):
        if value not in (1, 3):
            assert torch.all(block == value), value


def test_a_block_takes_whole_pages_and_the_pool_grows_by_slabs_that_are_powers_of_two():
    host = pool()
    first = host.allocate(4097)
    assert host.footprint(first) == 8 * KIB and host.used_bytes == 8 * KIB
    assert host.reserved_bytes == 64 * KIB
    big = host.allocate(100 * KIB)  # larger than a slab: a slab of its own, the next power of two
    assert host.reserved_bytes == (64 + 128) * KIB
    assert host.footprint(big) == 100 * KIB


def test_freed_pages_are_reused_and_an_emptied_slab_is_given_back_but_one():
    host = pool()
    rows = [host.allocate(16 * KIB + 100) for _ in range(9)]  # 5 pages each: 3 to a slab of 16 pages
    assert host.reserved_bytes == 3 * 64 * KIB
    for block in rows:
        host.free(block)
    host.allocate(1)  # frees are settled at the next allocation
    assert host.reserved_bytes == 64 * KIB  # one slab kept, holding the new block
    assert host.used_bytes == 4 * KIB


def test_whole_rows_cost_what_they_hold_not_the_next_power_of_two():
    """torch's pinned blocks round up to a power of two: 16.1 MiB rows would take 32 MiB each."""
    host = HostPool(pin=False)
    row = int(16.13 * 2**20)
    blocks = [host.allocate(row) for _ in range(21)]
    assert host.used_bytes < 1.01 * 21 * row
    assert host.reserved_bytes <= 3 * 128 * 2**20 < 21 * 32 * 2**20 / 1.7
    assert len({b.data_ptr() for b in blocks}) == 21


@pytest.mark.parametrize("bad", [dict(page_bytes=3000), dict(slab_bytes=100 * KIB), dict(page_bytes=128 * KIB)])
def test_bad_pool_sizes_are_named(bad):
    with pytest.raises(ValueError):
        pool(**bad)
