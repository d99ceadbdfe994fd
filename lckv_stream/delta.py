"""Trained weights shipped as a delta on top of the dense base model.

A delta folder holds `config.json` (the LCKV config), `delta.json` (format, base checksum, LoRA
settings, the sha256 of every shard) and `delta-*.safetensors` shards. A shard tensor either replaces
a model weight of the same name, or is a LoRA pair `<weight>.lora_A` / `<weight>.lora_B` merged as
W += B @ A * alpha / rank.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .base_model import sha256_of

FORMAT = "lckv-delta/1"
SHARD_BYTES = 15 * 2**20


class DeltaError(ValueError):
    """The delta does not fit the model, or its files are damaged; the text names the problem."""


def save_delta(
    folder: Path,
    config,
    tensors: dict[str, torch.Tensor],
    base: dict[str, str],
    lora: dict[str, float] | None = None,
    shard_bytes: int = SHARD_BYTES,
) -> list[Path]:
    """Write config.json, delta.json and shards of at most `shard_bytes` each."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    for old in folder.glob("delta-*.safetensors"):
        old.unlink()
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    paths = []
    for index, shard in enumerate(shards, start=1):
        path = folder / f"delta-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": FORMAT})
        paths.append(path)
    manifest = {
        "format": FORMAT,
        "base": base,
        "lora": lora or {},
        "files": {path.name: sha256_of(path) for path in paths},
    }
    (folder / "delta.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return paths


def read_delta(folder: Path, expected_base_sha256: str | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """The manifest and all tensors, after checking format, base and every shard's checksum."""
    folder = Path(folder)
    manifest_path = folder / "delta.json"
    if not manifest_path.is_file():
        raise DeltaError(f"{folder} is not a delta folder: delta.json is missing")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as error:
        raise DeltaError(f"{manifest_path} is corrupt: {error}") from error
    if manifest.get("format") != FORMAT:
        raise DeltaError(f"{manifest_path} has format {manifest.get('format')!r}; this version reads {FORMAT!r}")
    base_sha = manifest.get("base", {}).get("sha256")
    if expected_base_sha256 and base_sha != expected_base_sha256:
        raise DeltaError(
            f"the delta in {folder} was trained on a different base model (sha256 {base_sha}), "
            f"not on the one loaded ({expected_base_sha256})"
        )
    tensors: dict[str, torch.Tensor] = {}
    for name, checksum in manifest.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise DeltaError(f"delta file {path} is missing")
        if sha256_of(path) != checksum:
            raise DeltaError(f"delta file {path} is corrupt: its checksum does not match delta.json")
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError) as error:
            raise DeltaError(f"delta file {path} cannot be read: {error}") from error
    if not tensors:
        raise DeltaError(f"{folder} lists no delta files")
    return manifest, tensors


@torch.no_grad()
def apply_delta(model, folder: Path, expected_base_sha256: str | None = None) -> int:
    """Apply a delta folder to `model` in place; returns how many weights changed."""
    manifest, tensors = read_delta(folder, expected_base_sha256)
    params = dict(model.named_parameters())
    scale = float(manifest["lora"].get("alpha", 0)) / max(float(manifest["lora"].get("rank", 1)), 1.0)
    changed = 0
    for name, tensor in tensors.items():
        if name.endswith(".lora_B"):
            continue
        if name.endswith(".lora_A"):
            weight_name = name[: -len(".lora_A")]
            target = _param(params, weight_name, folder)
            down, up = tensor.float(), tensors.get(weight_name + ".lora_B")
            if up is None:
                raise DeltaError(f"delta in {folder} has {name} without its lora_B")
            update = (up.float() @ down) * scale
            _check_shape(target, update, weight_name, folder)
            target.add_(update.to(target.device, target.dtype))
        else:
            target = _param(params, name, folder)
            _check_shape(target, tensor, name, folder)
            target.copy_(tensor.to(target.device, target.dtype))
        changed += 1
    return changed


def _param(params: dict[str, torch.Tensor], name: str, folder: Path) -> torch.Tensor:
    if name not in params:
        raise DeltaError(f"delta in {folder} changes {name}, which this model does not have: wrong model or layer map")
    return params[name]


def _check_shape(target: torch.Tensor, tensor: torch.Tensor, name: str, folder: Path) -> None:
    if tuple(target.shape) != tuple(tensor.shape):
        raise DeltaError(
            f"delta in {folder}: {name} has shape {tuple(tensor.shape)} but the model's is {tuple(target.shape)}"
        )
