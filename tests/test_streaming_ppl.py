"""The streaming perplexity runs against brute force on a tiny model."""

import torch

from app_support.tiny import tiny_model
from lckv_stream import cla_map
from bench.streaming_ppl import recompute_nll, token_nll


def _brute_force(model, ids: torch.Tensor, context: int, chunk: int) -> torch.Tensor:
    """Token t predicted from ids[begin:t], begin = context tokens before t's chunk: one forward per token."""
    losses = []
    with torch.no_grad():
        for t in range(1, len(ids)):
            begin = max(0, (t // chunk) * chunk - context)
            logits = model(ids[begin:t].unsqueeze(0)).logits[0, -1].float()
            losses.append(torch.nn.functional.cross_entropy(logits.unsqueeze(0), ids[t : t + 1]))
    return torch.stack(losses)


def test_recompute_matches_one_forward_per_token():
    model = tiny_model(cla_map(4))
    ids = torch.randint(0, model.config.vocab_size, (37,), generator=torch.Generator().manual_seed(0))
    fast = recompute_nll(model, ids, context=9, chunk=5)
    assert fast.shape == (36,)
    assert torch.allclose(fast, _brute_force(model, ids, context=9, chunk=5), atol=1e-5)


def test_recompute_with_all_context_equals_the_unbounded_cache():
    model = tiny_model(cla_map(4))
    ids = torch.randint(0, model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    assert torch.allclose(recompute_nll(model, ids, context=64, chunk=8),
                          token_nll(model, ids, sink=0, window=64, chunk=8), atol=1e-5)
