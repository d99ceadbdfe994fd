"""Encoding new tokens into a cache and decoding one token at a time."""

from __future__ import annotations

from typing import Iterator

import torch

from .cache import SinkWindowCache


class EagerDecoder:
    """Runs the model directly for every call; works on any device."""

    name = "eager"

    def __init__(self, model, cache: SinkWindowCache) -> None:
        self.model = model
        self.cache = cache

    @torch.inference_mode()
    def prefill(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Encode token_ids [batch, T] into the cache; logits of the last one [batch, vocab]."""
        return self.model(token_ids, self.cache, logits_to_keep=1).logits[:, -1]

    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Append one token per row [batch]; logits for the next one [batch, vocab]."""
        return self.model(token_ids.view(-1, 1), self.cache, logits_to_keep=1).logits[:, -1]


def prefill_in_chunks(
    decoder, token_ids: list[int], chunk: int, device: torch.device
) -> Iterator[tuple[int, torch.Tensor]]:
    """Encode a long token list in chunks; yields (tokens done, logits of the last token so far)."""
    for start in range(0, len(token_ids), chunk):
        piece = torch.tensor([token_ids[start : start + chunk]], dtype=torch.long, device=device)
        yield min(start + chunk, len(token_ids)), decoder.prefill(piece)
