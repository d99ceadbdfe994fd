"""The Triton decode kernel run by Triton's interpreter on a CPU (float16: the interpreter has no
bfloat16) against the float64 reference. It runs where Triton is installed and there is no GPU
(`pip install triton`), so that a kernel can be checked before a GPU is at hand; elsewhere it is
skipped (on a GPU, `test_gpu.py` runs the kernel itself on the same cases)."""

import pytest

from interpreted import needs_interpreter, run_interpreted
from kernel_reference import CASES

pytestmark = needs_interpreter
# The interpreter runs each program in Python: the cases of up to about 3,100 slots in all.
SMALL = [case for case in CASES if case[3] * (case[0] + case[1]) <= 3200]


@pytest.mark.parametrize("case", SMALL, ids=lambda case: "-".join(map(str, case)))
def test_interpreted_decode_kernel_matches_a_float64_reference(case):
    run_interpreted("import torch; from kernel_reference import check_case; "
                    f"check_case(*{case!r}, device='cpu', dtype=torch.float16)")
