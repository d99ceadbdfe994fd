"""Held-out perplexity of the default model with its weights quantized for the CPU fast path.

The same text and windows as the model card's quality table: debian-handbook (`.data/heldout.txt`,
made by `scripts/prepare_text_data.py`, never trained on), encoded as `scripts/tokenize_corpora.py`
does, windows 0-63 of 1,024 tokens, each encoded whole (no cache). Every variant runs on the CPU in
one process, on the same tokens; the ratio to the float32 model is what quantizing costs.

    python bench/quantized_ppl.py --text .data/heldout.txt --out bench/results/cpu/quantized_ppl.json

Variants: float32 (the reference), bf16 (the model in bfloat16), int8 (the VNNI kernel where the CPU
has it), int8-torch (torch's weight-only kernel), int4-g32, int4-g64, ... (the VNNI int4 kernel where
the CPU has it); a `-head4` suffix also stores the output head in int4 (otherwise int8), an `-attn8`
suffix keeps the attention projections in int8 (int4 in the MLP only); a `bf16-` prefix runs the quantized model with
bfloat16 activations, as the CPU fast path does (`fast` is that: the engine's own `cpu_fast_model`).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "scripts")]

from lckv_stream.cpu_fast import cpu_fast_model  # noqa: E402
from lckv_stream.loading import load_model  # noqa: E402
from lckv_stream.quantize import QuantizationSettings, quantized_copy  # noqa: E402
from tokenize_corpora import encode_documents, read_documents  # noqa: E402
from train_distill import heldout_perplexity  # noqa: E402


def variant(model, name: str):
    """A copy of `model` as the variant `name` says (see the module docstring)."""
    if name == "fast":
        return cpu_fast_model(model)
    dtype = None
    if name.startswith("bf16"):
        dtype, name = torch.bfloat16, name[len("bf16"):].lstrip("-") or "float"
    if name in ("float32", "float"):
        return copy.deepcopy(model).to(dtype or torch.float32)
    head, kernel, attention = "int8", "auto", None
    if "-attn8" in name:
        attention, name = "int8", name.replace("-attn8", "")
    if "-head4" in name:
        head, name = "int4", name.replace("-head4", "")
    if name.endswith("-torch"):
        kernel, name = "torch", name[: -len("-torch")]
    weights, _, group = name.partition("-g")
    settings = QuantizationSettings(weights, head, int(group or 32), kernel, attention)
    return quantized_copy(model, settings, dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--text", type=Path, default=Path(".data/heldout.txt"))
    parser.add_argument("--windows", type=int, default=64)
    parser.add_argument("--variants", nargs="+", default=["float32", "fast", "int8", "int8-torch", "int4-g32"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model, tokenizer = load_model("default", "cpu", progress=lambda _: None)
    tokens = encode_documents(tokenizer, read_documents(args.text), chat_share=0.0, seed=0)
    results = {"text": str(args.text), "windows": args.windows, "window_tokens": 1024,
               "threads": torch.get_num_threads(), "runs": {}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for name in args.variants:
        began = time.time()
        ppl = heldout_perplexity(variant(model, name), np.asarray(tokens), 1024, args.windows, "cpu")
        results["runs"][name] = {"ppl": ppl, "seconds": round(time.time() - began, 1)}
        reference = results["runs"].get("float32", {}).get("ppl")
        ratio = f", {ppl / reference:.4f}x float32" if reference else ""
        print(f"{name}: perplexity {ppl:.3f}{ratio} ({time.time() - began:.0f} s)", flush=True)
        if reference:
            results["runs"][name]["ratio"] = ppl / reference
        args.out.write_text(json.dumps(results, indent=1))
    if not math.isfinite(results["runs"][args.variants[-1]]["ppl"]):
        raise SystemExit("perplexity is not finite")


if __name__ == "__main__":
    main()
