"""The fused decode step against the eager one, token by token on the same tokens: shared by the GPU
test (bfloat16 on CUDA) and the interpreted one (float16 on a CPU, Triton's interpreter)."""

import torch

from app_support.tiny import tiny_model
from lckv_stream import cla_map, lckv_map
from lckv_stream.decoding import decode_step
from lckv_stream.fusion import fuse_projections

# The layer maps the checks name: CLA, a map whose layers read the KV of a layer above them (no
# diagonal: the first token sees no key there), and one KV per layer.
MAPS = {"cla": cla_map(4, 2), "lckv": lckv_map(4, 1, 1), "plain": None}


def tiny_fused_model(layer_types, dtype, device, **overrides):
    """A small model the fused step serves: head size 32, two query heads per KV head."""
    config = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                  vocab_size=300)
    model = tiny_model(layer_types, **{**config, **overrides})
    with torch.no_grad():  # sharper attention than random weights give: a wrong key or place shows
        for layer in model.model.layers:
            for projection in ("q_proj", "k_proj"):
                if hasattr(layer.self_attn, projection):
                    getattr(layer.self_attn, projection).weight.mul_(4.0)
    model = model.to(device=device, dtype=dtype)
    fuse_projections(model)
    return model


def check_fused_step(layer_types, mode, sizes, steps, programs=1, device="cpu", dtype=torch.float16,
                     prompt_tokens=7, seed=0) -> float:
    """Feed the same tokens to the eager step and to the fused one, each on its own cache; every
    step's logits and the caches must agree within the dtype's rounding (the fused step keeps the
    residual stream in float32; the rows that step: the others' logits mean nothing). `sizes`: each
    row's (sink, window) in one buffer of the largest: rows of other sizes, rings that wrap, sinks
    whose place shifts. Returns the largest logit difference relative to the logits' scale."""
    from lckv_stream.fused_step import FusedStep

    model = tiny_fused_model(MAPS.get(layer_types, layer_types), dtype, device)
    sink, window = max(s for s, _ in sizes), max(w for _, w in sizes)
    caches = [model.new_cache(sink, window, batch_size=len(sizes)) for _ in range(2)]
    generator = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, model.config.vocab_size, (len(sizes), prompt_tokens), generator=generator).to(device)
    with torch.inference_mode():
        for cache in caches:
            for row, (row_sink, row_window) in enumerate(sizes):
                cache.set_row_size(row, row_sink, row_window)
            model(prompt, cache)  # the same eager prefill into both
        eager, fused_cache = caches
        fused = FusedStep(model, fused_cache, mode=mode, programs=programs)  # None: every multiprocessor
        worst = 0.0
        limit = 0.005 if dtype == torch.float16 else 0.03  # bfloat16 keeps 3 fewer bits
        for step in range(steps):
            token = torch.randint(3, model.config.vocab_size, (len(sizes), 1), generator=generator).to(device)
            stepping = torch.ones(len(sizes), dtype=torch.bool, device=device)
            if step % 5 == 3:  # rows that do not step: their caches must stay as they are
                stepping[1:] = False
            eager.active.copy_(stepping)
            fused_cache.active.copy_(stepping)
            want = decode_step(model, token, eager).float()[stepping]  # the others' logits mean nothing
            got = fused(model, token, fused_cache).float()[stepping]
            scale = want.abs().amax().item()
            error = (got - want).abs().amax().item() / scale
            assert error < limit, f"step {step}: logits differ by {error:.4f} of their scale"
            worst = max(worst, error)
            assert torch.equal(eager.token_index, fused_cache.token_index), f"step {step}: token_index"
            assert torch.equal(eager.seen, fused_cache.seen)
        held = eager.token_index >= 0  # [rows, slots]
        # The fused step reads the sinks' raw keys: what the key buffers' sink slots hold is the eager
        # step's own copy, rotated for its next call.
        window_held = held & (torch.arange(held.shape[1], device=device) >= sink)
        pairs = [(mine, theirs, window_held) for mine, theirs in zip(fused_cache.keys, eager.keys)]
        pairs += [(mine, theirs, held) for mine, theirs in zip(fused_cache.values, eager.values)]
        for mine, theirs, where in pairs:
            difference = (mine.float() - theirs.float()).abs().permute(0, 2, 1, 3)[where]
            assert difference.max().item() <= 0.02 * theirs.float().abs().max().item() + 1e-3
        eager.active[:] = True
        fused_cache.active[:] = True
        for mine, theirs in zip(fused_cache.sink_keys, eager.sink_keys):
            if mine.numel() == 0:  # no sinks
                continue
            assert (mine.float() - theirs.float()).abs().max().item() <= 0.02 * theirs.float().abs().max().item() + 1e-3
    return worst
