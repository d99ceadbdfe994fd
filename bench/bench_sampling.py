"""Time of choosing one next token (SmolLM2's 49,152-token vocabulary), side by side in one run.

  whole vocabulary: top-k as a mask over the vocabulary, top-p by sorting the whole vocabulary, one
                    draw among all tokens (how the sampler worked before)
  top-k first:      `lckv_stream.sampling.sample_next`: top-p over the k best, one draw among k
Both with the default settings (temperature 0.7, top_k 50, top_p 0.9, repetition penalty 1.1 over a
full 1,028-token cache). Median of 200 calls after a warm-up; on CUDA each call is synchronized.

    python bench/bench_sampling.py [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lckv_stream.sampling import SamplingSettings, penalize_repeats, sample_next

VOCAB, HELD = 49152, 1028


def whole_vocabulary(logits, settings, generator, previous, held):
    logits = penalize_repeats(logits.float(), previous, held, settings.repetition_penalty) / settings.temperature
    kth = torch.topk(logits, settings.top_k, dim=-1).values[:, -1:]
    logits = logits.masked_fill(logits < kth, float("-inf"))
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, dim=-1)
    drop = probs.cumsum(dim=-1) - probs >= settings.top_p
    logits = logits.scatter(1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return torch.multinomial(torch.softmax(logits, dim=-1), 1, generator=generator).squeeze(1)


def median_ms(sampler, device: torch.device) -> float:
    torch.manual_seed(0)
    logits = torch.randn(1, VOCAB, device=device) * 3
    previous = torch.randint(0, VOCAB, (1, HELD), device=device)
    held = torch.ones(1, HELD, dtype=torch.bool, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    settings = SamplingSettings()
    times = []
    for i in range(220):
        begin = time.perf_counter()
        int(sampler(logits, settings, generator, previous, held)[0])  # the engine reads the id too
        if i >= 20:
            times.append((time.perf_counter() - begin) * 1e3)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    rows = [("whole vocabulary", whole_vocabulary), ("top-k first (the sampler)", sample_next)]
    print(f"| sampler ({device.type}, {torch.get_num_threads()} threads) | ms per token |\n|---|---|")
    for name, sampler in rows:
        print(f"| {name} | {median_ms(sampler, device):.3f} |")


if __name__ == "__main__":
    main()
