"""A slow, independent reference: StreamingLLM token by token, written from the papers' definitions.

Plain Python lists of per-token keys/values, explicit RoPE and softmax; it shares nothing with the
package's attention or cache code, only the weights of the model under test.
"""

from __future__ import annotations

import math

import torch


def _rope(x: torch.Tensor, position: int, theta: float) -> torch.Tensor:
    """Rotate x [heads, dim] to `position` (Llama's half-split convention)."""
    dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    angles = position * inv_freq
    cos, sin = torch.cos(angles), torch.sin(angles)
    first, second = x[..., : dim // 2], x[..., dim // 2 :]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


@torch.no_grad()
def streaming_logits(model, token_ids: list[int], sink: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """Logits [T, vocab] of a token-by-token StreamingLLM run, and the stream indices held at the end.

    Before each token, if the cache is full, the oldest non-sink token is evicted; the new token is
    appended; positions are places in the cache. A layer reading a KV from above never sees the
    current token (it does not exist yet); `force_nodiag` hides it everywhere.
    """
    config = model.config
    theta = config.rope_parameters["rope_theta"]
    sources = config.layer_map.sources
    sliding = config.layer_map.sliding
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    groups = heads // kv_heads
    layers = model.model.layers
    held: list[int] = []
    store: dict[int, dict[int, tuple[torch.Tensor, torch.Tensor]]] = {j: {} for j in set(sources)}
    outputs = []
    for t, token in enumerate(token_ids):
        if len(held) == sink + window:
            evicted = held.pop(sink)
            for per_layer in store.values():
                per_layer.pop(evicted, None)
        held.append(t)
        place = {s: i for i, s in enumerate(held)}
        hidden = model.model.embed_tokens.weight[token].clone()
        for i, layer in enumerate(layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            if i in store:
                key = attn.k_proj(x).view(kv_heads, dim)
                value = attn.v_proj(x).view(kv_heads, dim)
                store[i][t] = (key, value)
            j = sources[i]
            visible = [s for s in held if s in store[j]]
            if config.force_nodiag:
                visible = [s for s in visible if s != t]
            if sliding[i]:
                visible = [s for s in visible if t - s < config.sliding_window]
            query = _rope(attn.q_proj(x).view(heads, dim), place[t], theta)
            out = torch.zeros(heads, dim)
            if visible:
                keys = torch.stack([_rope(store[j][s][0], place[s], theta) for s in visible])  # [n, kvh, d]
                values = torch.stack([store[j][s][1] for s in visible])
                for h in range(heads):
                    scores = keys[:, h // groups] @ query[h] / math.sqrt(dim)
                    out[h] = torch.softmax(scores, dim=0) @ values[:, h // groups]
            hidden = hidden + attn.o_proj(out.reshape(-1))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        outputs.append(model.lm_head(model.model.norm(hidden)))
    return torch.stack(outputs), held


def _attention(query, keys, values, visible):
    """softmax(q k^T / sqrt(d)) v over [heads, T, d] with a [T, T] visibility; no key: zero output."""
    scores = query @ keys.transpose(-1, -2) / math.sqrt(query.shape[-1])
    scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ values


def iterated_logits(model, token_ids: torch.Tensor, groups: list[tuple[int, int]], m: int, b: int) -> torch.Tensor:
    """Logits [T, vocab] of one sequence encoded in parallel as the LCKV paper defines it.

    Layers outside `groups` run once. Each group (start, stop) of layers with a cyclic dependency runs
    m + b times on the same input: iteration k reads the KVs made in iteration k - 1 (zeros before the
    first), the first m without gradients, the last b with them; the group's output is its last
    iteration's. A layer reading a KV from above (or every layer, with force_nodiag) sees only earlier
    tokens. Full-sequence attention with explicit masks; shares no code with the package.
    """
    config = model.config
    theta = config.rope_parameters["rope_theta"]
    sources, sliding = config.layer_map.sources, config.layer_map.sliding
    heads, kv_heads, dim = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    steps = token_ids.shape[0]
    t = torch.arange(steps)
    causal = t.view(-1, 1) >= t.view(1, -1)
    strict = t.view(-1, 1) > t.view(1, -1)
    window = (t.view(-1, 1) - t.view(1, -1)) < config.sliding_window

    def rotate(x):  # [T, h, d] at positions 0..T-1
        return torch.stack([_rope(x[i], i, theta) for i in range(steps)])

    def layer_forward(i, hidden, kv):
        layer = model.model.layers[i]
        attn = layer.self_attn
        x = layer.input_layernorm(hidden)
        if i in sources:
            kv[i] = (rotate(attn.k_proj(x).view(steps, kv_heads, dim)), attn.v_proj(x).view(steps, kv_heads, dim))
        keys, values = kv[sources[i]]
        visible = strict if (config.force_nodiag or sources[i] > i) else causal
        if sliding[i]:
            visible = visible & window
        query = rotate(attn.q_proj(x).view(steps, heads, dim)).transpose(0, 1)
        repeat = heads // kv_heads
        keys = keys.transpose(0, 1).repeat_interleave(repeat, dim=0)
        values = values.transpose(0, 1).repeat_interleave(repeat, dim=0)
        out = _attention(query, keys, values, visible).transpose(0, 1).reshape(steps, -1)
        hidden = hidden + attn.o_proj(out)
        return hidden + layer.mlp(layer.post_attention_layernorm(hidden))

    zeros = torch.zeros(steps, kv_heads, dim)
    kv = {j: (zeros, zeros) for j in set(sources)}
    hidden = model.model.embed_tokens.weight[token_ids]
    starts = {start: stop for start, stop in groups}
    i = 0
    while i < len(sources):
        if i not in starts:
            hidden = layer_forward(i, hidden, kv)
            i += 1
            continue
        stop = starts[i]
        group_input = hidden
        for iteration in range(m + b):
            with torch.set_grad_enabled(iteration >= m):
                hidden = group_input
                for j in range(i, stop):
                    hidden = layer_forward(j, hidden, kv)
        i = stop
    return model.lm_head(model.model.norm(hidden))
