"""The sampler's distribution against top-k / top-p written out over the whole vocabulary."""

import pytest
import torch

from lckv_stream.sampling import (
    SamplingSettings,
    candidate_count,
    next_token_distribution,
    penalize_repeats,
    sample_next,
    sample_with_noise,
)


def reference_probs(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """Full-vocabulary probabilities, one row: temperature, keep the top_k largest, then the smallest
    set of the most likely tokens whose probability reaches top_p; renormalize."""
    scaled = logits.double() / settings.temperature
    keep = torch.ones_like(scaled, dtype=torch.bool)
    if settings.top_k:
        keep[scaled.argsort(descending=True)[settings.top_k:]] = False
    probs = torch.where(keep, scaled, float("-inf")).softmax(-1)
    if settings.top_p < 1.0:
        total, kept = 0.0, torch.zeros_like(keep)
        for token in probs.argsort(descending=True).tolist():
            if total >= settings.top_p:
                break
            kept[token] = True
            total += float(probs[token])
        probs = torch.where(kept, probs, 0.0)
    return probs / probs.sum()


@pytest.mark.parametrize("top_k, top_p", [(50, 0.9), (50, 1.0), (0, 0.9), (0, 1.0), (3, 0.5), (1, 0.9), (400, 0.95)])
@pytest.mark.parametrize("temperature", [0.7, 1.3])
def test_distribution_matches_the_whole_vocabulary_reference(top_k, top_p, temperature):
    torch.manual_seed(top_k + int(100 * top_p))
    logits = torch.randn(3, 500) * 3
    settings = SamplingSettings(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=1.0)
    probs, ids = next_token_distribution(logits, settings)
    full = torch.zeros(3, 500, dtype=torch.float64)
    full.scatter_(1, torch.arange(500).expand(3, -1) if ids is None else ids, probs.double())
    for row in range(3):
        assert torch.allclose(full[row], reference_probs(logits[row], settings), atol=1e-6)


def test_draws_follow_the_distribution_and_map_back_to_token_ids():
    logits = torch.tensor([[0.0, 3.0, -1.0, 2.5, 1.0, 2.9, -4.0]])
    settings = SamplingSettings(temperature=1.0, top_k=3, top_p=1.0, repetition_penalty=1.0)
    generator = torch.Generator().manual_seed(0)
    draws = sample_next(logits.expand(20000, -1), settings, generator)  # 20,000 rows, one draw each
    assert set(draws.tolist()) == {1, 3, 5}
    expected = reference_probs(logits[0], settings)
    observed = torch.bincount(draws, minlength=7).double() / len(draws)
    assert (observed - expected).abs().max() < 0.015  # over 4 standard deviations of the estimate


def test_greedy_takes_the_penalized_argmax():
    logits = torch.tensor([[1.0, 5.0, 4.8]])
    settings = SamplingSettings(temperature=0.0, repetition_penalty=1.2)
    seen = torch.tensor([[1]])
    held = torch.ones_like(seen, dtype=torch.bool)
    assert int(sample_next(logits, settings, previous=seen, held=held)[0]) == 2
    assert int(sample_next(logits, settings)[0]) == 1
    assert torch.equal(penalize_repeats(logits, seen, held, 1.2)[0, 1], torch.tensor(5.0 / 1.2))


@pytest.mark.parametrize("top_k", [0, 4])
def test_a_token_cut_by_top_p_is_never_drawn_even_with_zero_noise(top_k):
    logits = torch.tensor([[4.0, 3.9, 0.0, -1.0, -2.0, 3.8]])
    settings = SamplingSettings(temperature=1.0, top_k=top_k, top_p=0.5, repetition_penalty=1.0)
    generator = torch.Generator().manual_seed(1)
    draws = sample_next(logits.expand(5000, -1), settings, generator)
    allowed = set(reference_probs(logits[0], settings).nonzero().flatten().tolist())
    assert set(draws.tolist()) == allowed == {0, 1}
    probs, ids = next_token_distribution(logits, settings)
    zero_noise = torch.zeros_like(probs)  # every ratio infinite or undefined without the clamp
    assert int(sample_with_noise(logits, settings, zero_noise)[0]) in allowed


def test_the_same_noise_gives_the_same_token():
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(2)) * 2
    settings = SamplingSettings(temperature=0.8, top_k=40, top_p=0.9, repetition_penalty=1.0)
    first = sample_next(logits, settings, torch.Generator().manual_seed(5))
    noise = torch.empty(4, candidate_count(settings, 300)).exponential_(generator=torch.Generator().manual_seed(5))
    assert torch.equal(sample_with_noise(logits, settings, noise), first)


def reference_noise(seed: int, draw: int, width: int) -> list[float]:
    """The counter-based noise written out per element on Python ints: Wellons' lowbias32 over the
    seed's and the draw count's 32-bit halves, then the column; Exp(1) from the 32-bit value."""
    import math

    def mix(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) % 2**32
        x ^= x >> 15
        x = (x * 0x846CA68B) % 2**32
        return x ^ (x >> 16)

    seed %= 2**64  # int64's two's complement bits
    h = 0x9E3779B9
    for part in (seed % 2**32, seed >> 32, draw % 2**32, draw >> 32):
        h = mix(h ^ part)
    return [float(torch.tensor(-math.log((mix(h ^ column) + 0.5) / 2**32), dtype=torch.float32))
            for column in range(width)]


def test_batched_noise_is_the_hash_of_each_rows_seed_and_draw():
    from lckv_stream.sampling import draw_noise, seed_hash

    seeds = [0, 1, 12345, 2**62 + 7, -3, -(2**63)]
    draws = [0, 1, 77, 2**32 + 5, 3, 2**40]
    noise = draw_noise(torch.tensor([seed_hash(s) for s in seeds]), torch.tensor(draws), 37)
    for row, (seed, draw) in enumerate(zip(seeds, draws)):
        assert noise[row].tolist() == reference_noise(seed, draw, 37), f"seed {seed}, draw {draw}"
