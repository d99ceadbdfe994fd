"""The decode kernel against a float64 reference written from the cache's semantics: shared by the
GPU test (bfloat16 on CUDA) and the interpreted one (float16 on a CPU, Triton's interpreter)."""

import torch

# (sink, window, seen, batch, sliding, no_diagonal, block): sinks or none, a wrapped ring, the
# no-diagonal mask, a sliding window, one token seen, 64 rows.
CASES = [(4, 1020, 3000, 1, 0, False, 0), (4, 252, 100, 2, 0, False, 0), (0, 300, 1000, 1, 0, False, 0),
         (24, 1020, 5000, 3, 0, True, 16), (24, 1020, 5000, 3, 0, True, 128), (4, 1020, 2000, 2, 64, False, 32),
         (4, 252, 1, 1, 0, True, 0), (4, 4092, 100000, 64, 0, False, 0)]


def cache_slots_after(seen: int, sink: int, window: int, batch: int, device: str = "cuda") -> torch.Tensor:
    """token_index of a cache that has seen `seen` tokens: each slot holds its latest stream index."""
    index = torch.full((batch, sink + window), -1, dtype=torch.long)
    for t in range(seen):
        index[:, t if t < sink else sink + (t - sink) % window] = t
    return index.to(device)


def rope_cos_sin(positions: torch.Tensor, dim: int, theta: float = 100000.0):
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=positions.device) / dim)
    angles = positions.double().unsqueeze(-1) * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


def rotated(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def reference_decode_attention(query, keys, values, sink_keys, token_index, t, sink, window, sliding, no_diagonal):
    """Masked softmax attention in float64, written out directly: the query rotated at t, sink keys
    at s + shift, window keys as stored."""
    capacity, dim = keys.shape[2], keys.shape[-1]
    cos, sin = rope_cos_sin(t, dim)
    query = rotated(query.double(), cos[:, None, None], sin[:, None, None])
    keys = keys.double().clone()
    if sink:
        shift = (t + 1 - capacity).clamp(min=0)
        cos, sin = rope_cos_sin(torch.arange(sink, device=t.device) + shift[:, None], dim)
        keys[:, :, :sink] = rotated(sink_keys.double(), cos[:, None], sin[:, None])
    scores = query @ keys.transpose(-1, -2) * dim**-0.5
    key, query_at = token_index[:, None, None, :], t[:, None, None, None]
    visible = (key >= 0) & ((key < query_at) if no_diagonal else (key <= query_at))
    visible &= (key < sink) | (key > query_at - window)
    if sliding:
        visible &= key > query_at - sliding
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1).nan_to_num(0.0)
    return probs @ values.double()


def check_case(sink, window, seen, batch, sliding, no_diagonal, block, device="cuda", dtype=torch.bfloat16) -> None:
    """One case through `decode_kernel.decode_attention` against the reference (relative error < 1%)."""
    from lckv_stream import decode_kernel

    assert decode_kernel.AVAILABLE
    torch.manual_seed(seen)
    heads, rows, dim, capacity = 3, 3, 64, sink + window
    query = torch.randn(batch, heads, rows, dim, device=device, dtype=dtype)
    keys, values = (torch.randn(batch, heads, capacity, dim, device=device, dtype=dtype) for _ in range(2))
    sink_keys = torch.randn(batch, heads, max(sink, 1), dim, device=device, dtype=dtype)[:, :, :sink]
    token_index = cache_slots_after(seen, sink, window, batch, device)
    t = torch.full((batch,), seen - 1, device=device)
    cos, sin = (x.to(dtype) for x in rope_cos_sin(t, dim))
    shift = (t + 1 - capacity).clamp(min=0)
    sink_cos, sink_sin = (x.to(dtype) for x in rope_cos_sin(torch.arange(sink, device=device) + shift[:, None], dim))
    if not sink:
        sink_keys, sink_cos, sink_sin = keys, cos, sin
    out = decode_kernel.decode_attention(query, cos, sin, keys, values, sink_keys, sink_cos, sink_sin, token_index,
                                         t, sink, window, sliding, no_diagonal, block)
    expected = reference_decode_attention(query, keys, values, sink_keys, token_index, t, sink, window,
                                          sliding, no_diagonal)
    assert out.shape == expected.shape and bool(out.isfinite().all())
    if seen == 1 and no_diagonal:
        assert bool((out == 0).all())  # the only cached token is the query itself: nothing to see
        return
    error = float((out.double() - expected).norm() / expected.norm())
    assert error < 1e-2, error
