"""The Triton decode kernel run by Triton's interpreter on a CPU (float16: the interpreter has no
bfloat16) against the float64 reference. It runs where Triton is installed and there is no GPU
(`pip install triton`), so that a kernel can be checked before a GPU is at hand; elsewhere it is
skipped (on a GPU, `test_gpu.py` runs the kernel itself on the same cases)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernel_reference import CASES

TESTS = Path(__file__).resolve().parent
pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None or torch.cuda.is_available(),
                                reason="needs Triton installed, and no GPU")
# The interpreter runs each program in Python: the cases of up to about 3,100 slots in all.
SMALL = [case for case in CASES if case[3] * (case[0] + case[1]) <= 3200]


@pytest.mark.parametrize("case", SMALL, ids=lambda case: "-".join(map(str, case)))
def test_interpreted_decode_kernel_matches_a_float64_reference(case):
    code = ("import torch; from kernel_reference import check_case; "
            f"check_case(*{case!r}, device='cpu', dtype=torch.float16)")
    # The interpreter is chosen when Triton's functions are defined: a fresh process with it set.
    path = os.pathsep.join(filter(None, [str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": path},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
