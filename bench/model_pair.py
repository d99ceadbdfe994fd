"""The dense teacher and the default student, loaded the same way for the evaluations in bench/.

`for_both(fn, ...)` runs fn(model, tokenizer, ...) once with each model. On the CPU it runs them side
by side in two processes of one thread each: on a small machine shared with other work, one 2-thread
process stalls whenever one of its threads is descheduled (decoding measured 20x slower under load),
while two 1-thread processes keep both cores busy.
"""

from __future__ import annotations

import multiprocessing
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lckv_stream.base_model import GGUF_SHA256, cache_dir, load_base  # noqa: E402
from lckv_stream.loading import load_model  # noqa: E402

MODELS = ("teacher", "student")


def teacher_folder() -> Path:
    """The base model as a transformers Llama folder (made from the GGUF on first use)."""
    return cache_dir() / "SmolLM2-135M-Instruct"


def ensure_base() -> None:
    """Convert the base GGUF once, before processes that would race to do it."""
    marker = teacher_folder() / "from-gguf.sha256"
    if not (marker.is_file() and marker.read_text().strip() == GGUF_SHA256):
        load_base("cpu")


def load_one(which: str, student: str = "default", device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer). The teacher is the base SmolLM2 with every layer keeping its own KV (the identity
    layer map, equal to the dense Llama), in the same class, dtype and chat template as the student."""
    source = str(teacher_folder()) if which == "teacher" else student
    model, tokenizer = load_model(source, device, dtype, progress=lambda _: None)
    return model.eval(), tokenizer


def _run(which: str, student: str, device: str, threads: int | None, fn: Callable, args: tuple):
    if threads:
        torch.set_num_threads(threads)
    model, tokenizer = load_one(which, student, device)
    return fn(model, tokenizer, *args)


def for_both(fn: Callable, *args, student: str = "default", device: str = "cpu", parallel: bool | None = None) -> dict:
    """{'teacher': fn(teacher, tokenizer, *args), 'student': fn(student, tokenizer, *args)}."""
    ensure_base()
    if parallel is None:
        parallel = device == "cpu"
    if not parallel:
        return {which: _run(which, student, device, None, fn, args) for which in MODELS}
    with ProcessPoolExecutor(len(MODELS), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {which: pool.submit(_run, which, student, device, 1, fn, args) for which in MODELS}
        return {which: future.result() for which, future in futures.items()}
