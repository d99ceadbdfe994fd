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


def sample_next(
    logits: torch.Tensor,
    settings: SamplingSettings,
    generator: torch.Generator | None = None,
    previous: torch.Tensor | None = None,
    held: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token ids [batch] from logits [batch, vocab]."""
    logits = logits.float()
    if previous is not None and settings.repetition_penalty != 1.0:
        logits = penalize_repeats(logits, previous, held, settings.repetition_penalty)
    if settings.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / settings.temperature
    if settings.top_k:
        kth = torch.topk(logits, min(settings.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if settings.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop = probs.cumsum(dim=-1) - probs >= settings.top_p
        logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)
