"""Running Triton kernels through Triton's interpreter on a CPU, for the tests that check a kernel
before a GPU is at hand (where Triton is installed and there is no GPU)."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent

needs_interpreter = pytest.mark.skipif(importlib.util.find_spec("triton") is None or torch.cuda.is_available(),
                                       reason="needs Triton installed, and no GPU")


def run_interpreted(code: str, interpret: bool = True, env: dict[str, str] | None = None) -> None:
    """Run `code` (Python, with tests/ and the checkout on the path) in a fresh process under the
    interpreter, which Triton chooses when its functions are defined (`interpret=False`: with
    Triton's compiler, as `hopper_compile` needs; `env`: more variables for it); fail with its
    error output."""
    path = os.pathsep.join(filter(None, [str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH")]))
    variables = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    variables.update({"PYTHONPATH": path, **({"TRITON_INTERPRET": "1"} if interpret else {}), **(env or {})})
    result = subprocess.run([sys.executable, "-c", code], env=variables, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
