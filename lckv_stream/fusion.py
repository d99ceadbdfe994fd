"""Fused projection weights for inference: one matrix product where the layer had two or three.

A decode step multiplies one token's hidden state by every weight matrix: at this model size each
product is a short kernel launch, and the q/k/v (and gate/up) products read the same input. After
`fuse_projections`, each layer keeps one concatenated weight and its Linear layers' weights become
views into it, so the weights stay shared (loading a delta or editing a weight in place updates the
fused matrix too). The fused path serves inference only (no gradient); training uses the Linears.
"""

from __future__ import annotations

import torch
from torch import nn


def _fuse(linears: list[nn.Linear]) -> torch.Tensor | None:
    """One weight [sum of outputs, inputs]; each Linear's weight becomes a view of its rows."""
    if any(type(layer) is not nn.Linear or layer.bias is not None for layer in linears):
        return None  # adapters (training) or biases: leave the layer as it is
    fused = torch.cat([layer.weight.detach() for layer in linears])
    row = 0
    for layer in linears:
        rows = layer.weight.shape[0]
        layer.weight = nn.Parameter(fused[row : row + rows], requires_grad=False)
        row += rows
    return fused


@torch.no_grad()
def fuse_projections(model) -> int:
    """Fuse q/k/v (layers that compute KV) and gate/up of every layer in place; returns how many.

    Call it after the model has its final device and dtype: moving it afterwards copies the views
    and the fused matrices apart.
    """
    fused = 0
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        if attention.computes_kv and attention.qkv_weight is None:
            attention.qkv_weight = _fuse([attention.q_proj, attention.k_proj, attention.v_proj])
            fused += attention.qkv_weight is not None
        if mlp.gate_up_weight is None:
            mlp.gate_up_weight = _fuse([mlp.gate_proj, mlp.up_proj])
            fused += mlp.gate_up_weight is not None
    return fused
