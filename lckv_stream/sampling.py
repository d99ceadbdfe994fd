"""Sampling settings (validated) and the next-token sampler."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .limits import DEFAULTS, LIMITS, check  # noqa: F401  (LIMITS: the ranges, re-exported)


@dataclass(frozen=True)
class SamplingSettings:
    """How the next token is chosen. temperature 0 means greedy; top_k 0 means no top-k cut."""

    temperature: float = DEFAULTS["temperature"]
    top_p: float = DEFAULTS["top_p"]
    top_k: int = DEFAULTS["top_k"]
    repetition_penalty: float = DEFAULTS["repetition_penalty"]
    max_new_tokens: int = DEFAULTS["max_new_tokens"]

    def __post_init__(self) -> None:
        """Every field checked against `limits.LIMITS` (whole-number fields become ints)."""
        for spec in fields(self):
            object.__setattr__(self, spec.name, check(spec.name, getattr(self, spec.name)))


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


# ---- batched sampling: every row with its own settings and its own stream of random draws ------

_M32 = 0xFFFFFFFF


def _mul32(x: "torch.Tensor | int", factor: int) -> "torch.Tensor | int":
    """(x * factor) mod 2^32 for x < 2^32 in int64, without int64 overflow (16-bit halves)."""
    low, high = x & 0xFFFF, x >> 16
    return (low * factor + (((high * factor) & 0xFFFF) << 16)) & _M32


def _mix32(x: "torch.Tensor | int") -> "torch.Tensor | int":
    """A 32-bit integer hash with good avalanche (Wellons' lowbias32), of tensors or Python ints."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


_HASH_START = 0x9E3779B9


def seed_hash(seed: int) -> int:
    """The noise hash's state after a row's seed (its two 32-bit halves, as int64 stores them): the
    part of every draw's hash that depends on the seed alone, computed once per row on the host."""
    seed = (seed + 2**63) % 2**64 - 2**63  # the int64 the seed is stored as
    h = _HASH_START
    for part in (seed & _M32, (seed >> 32) & _M32):
        h = _mix32(h ^ part)  # on Python ints: the same bit operations, exact
    return h


def draw_noise(seed_hashes: torch.Tensor, draws: torch.Tensor, width: int) -> torch.Tensor:
    """Exp(1) noise [batch, width] for each row's `draws`-th draw from its own seed (`seed_hash`) [batch].

    Counter-based: a row's draws depend on its seed and count alone, never on the rows it is batched
    with or on the order of other work, and computing them is a few elementwise kernels a CUDA graph
    can replay (a torch.Generator per row would cost a launch per row per token)."""
    h, draws = seed_hashes.view(-1, 1), draws.view(-1, 1)
    for part in (draws & _M32, (draws >> 32) & _M32):
        h = _mix32(h ^ part)
    h = _mix32(h ^ torch.arange(width, device=draws.device).view(1, -1))
    uniform = (h.double() + 0.5) / 2.0**32  # in (0, 1): never 0, never 1
    return (-torch.log(uniform)).float()


@dataclass(frozen=True)
class RowSampling:
    """Per-row sampling parameters as tensors [batch] (one entry per row of a batched step)."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    repetition_penalty: torch.Tensor
    seed_hashes: torch.Tensor  # `seed_hash` of each row's seed
    draws: torch.Tensor

    @classmethod
    def of(cls, settings: list[SamplingSettings], seeds: list[int], draws: list[int],
           device: torch.device | str = "cpu") -> "RowSampling":
        def column(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(column([s.temperature for s in settings], torch.float32),
                   column([s.top_p for s in settings], torch.float32),
                   column([s.repetition_penalty for s in settings], torch.float32),
                   column([seed_hash(seed) for seed in seeds], torch.long), column(draws, torch.long))


def width_of(settings: SamplingSettings, vocab_size: int) -> int:
    """Candidates a row's draw is among: its top_k, or the whole vocabulary. Rows are batched by
    width, so that a row's arithmetic has the same shapes whatever it is batched with."""
    return candidate_count(settings, vocab_size)


def sample_rows(
    logits: torch.Tensor,
    rows: RowSampling,
    width: int,
    previous: torch.Tensor | None = None,
    held: torch.Tensor | None = None,
) -> torch.Tensor:
    """Next token ids [batch] from logits [batch, vocab], each row with its own temperature (0:
    greedy), top-p, repetition penalty and noise, among its `width` best candidates (the whole
    vocabulary, sorted, when width is the vocabulary size). Each row's result depends on that row
    alone: the same row gives the same token in a batch of one or of sixty-four."""
    logits = logits.float()
    if previous is not None:
        logits = penalize_rows(logits, previous, held, rows.repetition_penalty)
    greedy = logits.argmax(dim=-1)
    temperature = rows.temperature.view(-1, 1)
    scaled = logits / torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    if width < logits.shape[-1]:
        values, ids = torch.topk(scaled, width, dim=-1)
    else:
        values, ids = torch.sort(scaled, descending=True, dim=-1)
    probs = torch.softmax(values, dim=-1)
    top_p = rows.top_p.view(-1, 1)
    # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
    probs = probs.masked_fill((probs.cumsum(dim=-1) - probs >= top_p) & (top_p < 1.0), 0.0)
    probs = probs / probs.sum(dim=-1, keepdim=True)
    noise = draw_noise(rows.seed_hashes, rows.draws, width)
    choice = (probs / noise).argmax(dim=-1, keepdim=True)
    return torch.where(rows.temperature > 0, ids.gather(1, choice).squeeze(1), greedy)


def penalize_rows(logits: torch.Tensor, previous: torch.Tensor, held: torch.Tensor,
                  penalty: torch.Tensor) -> torch.Tensor:
    """`penalize_repeats` with a penalty per row [batch] (1.0 leaves a row exactly as it was)."""
    counts = torch.zeros_like(logits, dtype=torch.int32).scatter_add_(1, previous, held.to(torch.int32))
    penalty = penalty.view(-1, 1)
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(counts > 0, penalized, logits)
