import sys
from pathlib import Path

import pytest
import torch

TESTS = Path(__file__).resolve().parent
# The repository root (app.py, app_support/) and this folder (served_app.py) import as top-level modules,
# with `pytest` as with `python -m pytest`.
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

from app_support.tiny import tiny_tokenizer  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(1234)
    yield
