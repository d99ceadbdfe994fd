"""The embedded default model: SmolLM2-135M-Instruct converted to LCKV plus the shipped trained delta."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .base_model import GGUF_SHA256, load_base
from .config import LCKVLlamaConfig
from .convert import convert_llama
from .delta import apply_delta



def _default_delta() -> Path:
    """The shipped model's folder: assets/smollm2-135m-kv21 in a source checkout (or an editable
    install); an installed package carries a copy as its package data, default_model_files/."""
    here = Path(__file__).resolve().parent
    checkout = here.parent / "assets" / "smollm2-135m-kv21"
    return checkout if (checkout / "config.json").is_file() else here / "default_model_files"


DEFAULT_DELTA = _default_delta()


def default_layer_types(delta: Path = DEFAULT_DELTA) -> str:
    """The shipped model's layer map (benchmarks build random-weight models of the same shape)."""
    if not (Path(delta) / "config.json").is_file():
        raise FileNotFoundError(f"no LCKV config at {delta}: the default model's folder is incomplete")
    return LCKVLlamaConfig.from_pretrained(delta).layer_types


def load_default_model(
    device: str = "cpu",
    dtype: torch.dtype | None = None,
    delta: Path = DEFAULT_DELTA,
    progress: Callable[[str], None] = print,
):
    """(model, tokenizer) of the default LCKV chat model; network only for the one-time base fetch."""
    base, tokenizer = load_base("cpu", torch.float32, progress)
    config = LCKVLlamaConfig.from_pretrained(delta)
    fields = {k: getattr(config, k) for k in ("forward_passes", "backward_passes", "sliding_window")}
    model = convert_llama(base, config.layer_types, **fields)
    del base
    apply_delta(model, delta, expected_base_sha256=GGUF_SHA256)
    return model.to(device=device, dtype=dtype or torch.float32).eval(), tokenizer
