"""Resolve what the user names as a model: 'default', a local folder, a GGUF file, or a Hub id."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from .convert import convert_llama
from .cpu_threads import in_passing_thread
from .layer_map import identity_map


class ModelLoadError(ValueError):
    """The named model cannot be loaded; the text says why and what is accepted."""


def pick_device(device: str | None = None) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} was asked for but no CUDA GPU is available")
    return device


def default_dtype(device: str) -> torch.dtype:
    return torch.bfloat16 if device.startswith("cuda") else torch.float32


def load_model(
    source: str = "default",
    device: str | None = None,
    dtype: torch.dtype | None = None,
    layer_types: str | None = None,
    progress: Callable[[str], None] = print,
):
    """(model, tokenizer) for `source`, moved to `device` in `dtype`.

    source: 'default' (the embedded LCKV chat model), a delta folder (delta.json: trained weights on
    top of the base, like the default's), a folder with config.json (lckv-llama, or a Llama that is
    converted with `layer_types`, identity by default), a .gguf file, or a Hub id. Loaded on a
    passing thread, so that the caller's thread keeps no OpenMP team (cpu_threads.py says why).
    """
    return in_passing_thread(_load_model, source, device, dtype, layer_types, progress)


def _load_model(source: str, device: str | None, dtype: torch.dtype | None, layer_types: str | None,
                progress: Callable[[str], None]):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(device)
    dtype = dtype or default_dtype(device)
    if source == "default":
        from .default_model import load_default_model

        return load_default_model(device, dtype, progress=progress)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"model file {path} does not exist")
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        llama = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        return _as_lckv(llama, layer_types).to(device, dtype), tokenizer
    if (path / "delta.json").is_file():
        from .default_model import load_default_model

        return load_default_model(device, dtype, delta=path, progress=progress)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{path} has no config.json: give a model folder, a .gguf file, or 'default'")
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type not in ("lckv-llama", "llama"):
            raise ModelLoadError(f"{path} holds a {model_type!r} model; lckv-stream runs lckv-llama and llama models")
    elif source.count("/") != 1 or source.startswith((".", "/", "~")):
        raise ModelLoadError(
            f"model {source!r} not found: give 'default', a local folder with config.json, a .gguf file, "
            "or a Hugging Face id like 'whynlp/tinyllama-lckv-w10-ft-250b'"
        )
    from .modeling import register_auto_classes

    register_auto_classes()  # an lckv-llama folder or Hub id loads through the Auto classes
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype, trust_remote_code=False)
    except OSError as error:
        raise ModelLoadError(f"could not load {source!r}: {error}") from error
    return _as_lckv(model, layer_types).to(device, dtype).eval(), tokenizer


def _as_lckv(model, layer_types: str | None):
    """LCKV models pass through; Llama models are converted (identity map unless told otherwise)."""
    from .modeling import LCKVLlamaForCausalLM

    if isinstance(model, LCKVLlamaForCausalLM):
        if layer_types and layer_types != model.config.layer_types:
            raise ModelLoadError("--layer-types applies to Llama checkpoints; this model already has its layer map")
        return model.eval()
    return convert_llama(model, layer_types or identity_map(model.config.num_hidden_layers))
