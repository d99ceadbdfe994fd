"""Sampling settings (validated) and the next-token sampler."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

# (low, high) inclusive bounds of every setting, for validation and for UI sliders.
LIMITS: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.05, 1.0),
    "top_k": (0, 1000),
    "repetition_penalty": (1.0, 2.0),
    "max_new_tokens": (1, 4096),
}


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen. temperature 0 means greedy; top_k 0 means no top-k cut."""

    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    max_new_tokens: int = 512

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            low, high = LIMITS[spec.name]
            whole = spec.type in (int, "int")
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{spec.name} must be a number, got {value!r}")
            if whole and value != int(value):
                raise ValueError(f"{spec.name} must be a whole number, got {value!r}")
            if not math.isfinite(value) or not low <= value <= high:
                raise ValueError(f"{spec.name} must be between {low:g} and {high:g}, got {value!r}")
            if whole:
                object.__setattr__(self, spec.name, int(value))


def penalize_repeats(logits: torch.Tensor, previous: torch.Tensor, held: torch.Tensor, penalty: float) -> torch.Tensor:
    """Divide positive / multiply negative logits of tokens seen in `previous` [batch, n] where `held`."""
    counts = torch.zeros_like(logits, dtype=torch.int32).scatter_add_(1, previous, held.to(torch.int32))
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(counts > 0, penalized, logits)


def _penalized(logits: torch.Tensor, settings: SamplingSettings, previous: torch.Tensor | None,
               held: torch.Tensor | None) -> torch.Tensor:
    if previous is None or settings.repetition_penalty == 1.0:
        return logits
    return penalize_repeats(logits, previous, held, settings.repetition_penalty)


def next_token_distribution(
    logits: torch.Tensor,
    settings: SamplingSettings,
    previous: torch.Tensor | None = None,
    held: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Probabilities [batch, n] over candidate tokens and their ids [batch, n] (None: n is the whole
    vocabulary, in order). Needs temperature > 0.

    With top_k, only the k best logits are kept (`topk` returns them sorted), so top-p works on k
    sorted values instead of sorting the whole vocabulary, and the draw is among k tokens.
    """
    logits = _penalized(logits.float(), settings, previous, held) / settings.temperature
    if settings.top_k:
        logits, ids = torch.topk(logits, candidate_count(settings, logits.shape[-1]), dim=-1)
    elif settings.top_p < 1.0:
        logits, ids = torch.sort(logits, descending=True, dim=-1)
    else:
        return torch.softmax(logits, dim=-1), None
    probs = torch.softmax(logits, dim=-1)
    if settings.top_p < 1.0:
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        probs = probs.masked_fill(probs.cumsum(dim=-1) - probs >= settings.top_p, 0.0)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs, ids


def sample_next(
    logits: torch.Tensor,
    settings: SamplingSettings,
    generator: torch.Generator | None = None,
    previous: torch.Tensor | None = None,
    held: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token ids [batch] from logits [batch, vocab]."""
    if settings.temperature == 0:
        return sample_with_noise(logits, settings, None, previous, held)
    noise = torch.empty(logits.shape[0], candidate_count(settings, logits.shape[-1]), device=logits.device)
    return sample_with_noise(logits, settings, noise.exponential_(generator=generator), previous, held)


def candidate_count(settings: SamplingSettings, vocab_size: int) -> int:
    """Width of `next_token_distribution`'s output: the top_k candidates, or the whole vocabulary."""
    return min(settings.top_k, vocab_size) if settings.top_k else vocab_size


def sample_with_noise(
    logits: torch.Tensor,
    settings: SamplingSettings,
    noise: torch.Tensor | None,
    previous: torch.Tensor | None = None,
    held: torch.Tensor | None = None,
) -> torch.Tensor:
    """`sample_next` given its random numbers: noise [batch, candidate_count] of Exp(1) draws (unused
    when greedy). With the noise drawn apart, every kernel here has fixed shapes and no randomness of
    its own, so a CUDA graph can replay it.

    The token is the argmax of probs / noise: with i.i.d. exponential noise that is an exact draw
    from probs, and a zero probability never wins.
    """
    if settings.temperature == 0:
        return _penalized(logits.float(), settings, previous, held).argmax(dim=-1)
    probs, ids = next_token_distribution(logits, settings, previous, held)
    choice = (probs / noise.clamp(min=torch.finfo(noise.dtype).tiny)).argmax(dim=-1, keepdim=True)
    return (choice if ids is None else ids.gather(1, choice)).squeeze(1)
