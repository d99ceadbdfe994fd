import os
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
# app.py and app_support/ are not part of the installed package: the repository root is put on the path,
# with `pytest` as with `python -m pytest` (which also lets tests import bench/ and scripts/ modules);
# lckv_stream imports from there too when the package is not installed. This folder (reference.py,
# served_app.py) is on the path through pytest itself.
sys.path.insert(0, str(TESTS.parent))

from app_support.tiny import tiny_tokenizer  # noqa: E402

# The tests' models are tiny: a second intra-op thread buys nothing there, and on a shared or busy
# machine every small operation waits for it to be scheduled (a tiny decode step took 100 ms).
torch.set_num_threads(1)
# The suite checks the engine's semantics against float references on hundreds of tiny caches: on a
# CPU it runs the float32 steps unless a test asks for the fast path (tests/test_cpu_fast.py), which
# would also compile a step for every new cache shape.
os.environ.setdefault("LCKV_CPU_FAST", "0")


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield
