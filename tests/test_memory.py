import gc
import threading

import pytest
import torch

from lckv_stream.memory import release_freed_memory
from lckv_stream.metrics import process_rss_mb


def test_memory_freed_by_another_thread_goes_back_to_the_system():
    """What closed conversations leave behind: host tensors of ~800 KB (a layer of a cache row)
    made on the engine's thread, then freed. glibc keeps such chunks in that thread's arena;
    release_freed_memory hands them back."""
    before = process_rss_mb()
    made: list[torch.Tensor] = []
    worker = threading.Thread(target=lambda: made.extend(torch.ones(200 * 1024) for _ in range(400)))
    worker.start()
    worker.join()
    grown = process_rss_mb()
    if grown - before < 200:
        pytest.skip(f"the allocator did not grow the process as expected ({grown - before:.0f} MB)")
    made.clear()
    gc.collect()
    kept = process_rss_mb()
    if not release_freed_memory():
        pytest.skip("no glibc malloc_trim here")
    print(f"\nRSS {before:.0f} MB, {grown:.0f} with 320 MB of tensors, {kept:.0f} once freed, "
          f"{process_rss_mb():.0f} after release_freed_memory")
    assert process_rss_mb() - before < 0.25 * (grown - before)
