"""Streaming perplexity (the StreamingLLM check) of the default model over a long natural text.

Runs over the same token stream, each encoded in chunks with exact streaming semantics:
  sinks     : 4 sink tokens + a window of 1,020 (1,024 cached tokens)
  window    : a window of 1,024 and no sinks
  dense     : nothing evicted, up to the trained context (8,192 tokens)
  recompute : sliding window with re-computation, the StreamingLLM paper's oracle: each chunk is
              encoded afresh after the 1,024 tokens before it (no cache), so every token sees
              1,024-1,279 earlier tokens at positions inside the trained context
Reports perplexity per 4,096-token segment, and each segment's sinks/recompute ratio: the same text
with and without the cache, which separates what the cache costs from how hard the text is.
Writes JSON and a PNG plot.

    python bench/streaming_ppl.py --text .data/stream.txt.xz --tokens 200000 --out bench/results/streaming
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import time
from pathlib import Path

import torch

from lckv_stream.loading import load_model

SEGMENT = 4096
RUNS = {"sinks": (4, 1020), "window": (0, 1024), "dense": (0, 8192), "recompute": (0, 1024)}


@torch.inference_mode()
def token_nll(model, ids: torch.Tensor, sink: int, window: int, chunk: int) -> torch.Tensor:
    """Negative log-likelihood of ids[1:] given everything before, through a sink + window cache."""
    cache = model.new_cache(sink, window)
    losses = []
    previous_last = None
    for start in range(0, len(ids), chunk):
        piece = ids[start : start + chunk]
        logits = model(piece.unsqueeze(0), cache).logits[0].float()
        if previous_last is not None:
            losses.append(torch.nn.functional.cross_entropy(previous_last.unsqueeze(0), piece[:1]))
            losses[-1] = losses[-1].view(1)
        losses.append(torch.nn.functional.cross_entropy(logits[:-1], piece[1:], reduction="none"))
        previous_last = logits[-1]
    return torch.cat(losses)


@torch.inference_mode()
def recompute_nll(model, ids: torch.Tensor, context: int, chunk: int) -> torch.Tensor:
    """Negative log-likelihood of ids[1:], each chunk encoded afresh after the `context` tokens before it."""
    losses = []
    for start in range(0, len(ids), chunk):
        begin = max(0, start - context)
        end = min(start + chunk, len(ids))
        logits = model(ids[begin:end].unsqueeze(0)).logits[0].float()
        first = max(start, 1)  # token t is predicted by the logits at t - 1
        losses.append(torch.nn.functional.cross_entropy(logits[first - 1 - begin : end - 1 - begin],
                                                        ids[first:end], reduction="none"))
    return torch.cat(losses)


def segment_ppl(nll: torch.Tensor) -> list[float]:
    return [math.exp(nll[i : i + SEGMENT].mean().item()) for i in range(0, len(nll) - SEGMENT + 1, SEGMENT)]


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(9, 4))
    for name, run in results["runs"].items():
        ends = [(i + 1) * SEGMENT for i in range(len(run["segments"]))]
        axis.plot(ends, run["segments"], marker="." if name == "dense" else None, label=run["label"])
    axis.set_xscale("log")
    axis.set_yscale("log")
    axis.set_xlabel("tokens into the stream")
    axis.set_ylabel(f"perplexity of each {SEGMENT}-token segment")
    axis.legend()
    axis.set_title(results["title"])
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, default=Path(".data/stream.txt.xz"))
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--model", default="default")
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model, tokenizer = load_model(args.model, args.device, progress=lambda _: None)
    with lzma.open(args.text, "rt", encoding="utf-8") as handle:
        text = handle.read()
    ids = torch.tensor(tokenizer(text[: args.tokens * 8], add_special_tokens=False)["input_ids"][: args.tokens],
                       device=model.device)
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "streaming_ppl.json"
    results = json.loads(saved.read_text()) if saved.exists() else {"runs": {}}  # runs may be added later
    results["title"] = f"{args.model} model, {args.text.name}"
    for name in args.runs:
        sink, window = RUNS[name]
        began = time.time()
        length = min(len(ids), sink + window) if name == "dense" else len(ids)
        if name == "recompute":
            nll = recompute_nll(model, ids[:length], window, args.chunk)
        else:
            nll = token_nll(model, ids[:length], sink, window, args.chunk)
        label = {"dense": f"dense (first {length} tokens)",
                 "recompute": f"recompute ({window} tokens before each chunk, no cache)"}.get(
                     name, f"{name} ({sink} sink + {window} window)")
        results["runs"][name] = {"label": label, "sink": sink, "window": window, "tokens": length,
                                 "ppl": math.exp(nll.mean().item()), "segments": segment_ppl(nll)}
        print(name, f"ppl {results['runs'][name]['ppl']:.2f}", f"{time.time() - began:.0f}s", flush=True)
        saved.write_text(json.dumps(results, indent=1))
    runs = results["runs"]
    if "sinks" in runs and "recompute" in runs:
        ratios = [a / b for a, b in zip(runs["sinks"]["segments"], runs["recompute"]["segments"])]
        results["sinks_over_recompute"] = ratios
        saved.write_text(json.dumps(results, indent=1))
        print(f"sinks / recompute per segment: {min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} segments",
              flush=True)
    plot(results, args.out / "streaming_ppl.png")


if __name__ == "__main__":
    main()
