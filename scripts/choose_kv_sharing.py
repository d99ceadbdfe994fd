"""Rank the shared layers of a CLA map by what sharing costs the dense model: the maps to train next.

A trained student's weights have adapted to its map, so giving one of its layers the teacher's
attention back says little (the rest no longer fits it). The cost of sharing is measured on the
dense teacher instead: for each layer that reads another layer's KV in the student's map, the
teacher with only that layer sharing; its log-perplexity increase ranks the layers. Then the
costliest layers get their own KV again, one more at a time up to --max-layers: the maps to train
(`cumulative[k - 1]` gives k layers their own KV). Held-out windows from --first-window on, apart
from those the final evaluation uses (0-63).

    python scripts/choose_kv_sharing.py --data /tmp/lckv/data --delta CLA2_DELTA_FOLDER --out choice.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import torch

from lckv_stream import LayerMap
from lckv_stream.base_model import load_base
from lckv_stream.convert import convert_llama
from train_distill import SELECTION_WINDOWS, heldout_perplexity  # its neighbour in scripts/


def unshare(layer_types: str, layers: set[int]) -> str:
    """The map with each of `layers` reading its own KV."""
    parsed = LayerMap.parse(layer_types)
    return "_".join(str(i if i in layers else src) for i, src in enumerate(parsed.sources))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="folder with heldout.npy")
    parser.add_argument("--delta", type=Path, required=True, help="the trained student (delta folder): its map")
    parser.add_argument("--max-layers", type=int, default=8)
    parser.add_argument("--first-window", type=int, default=SELECTION_WINDOWS[0])
    parser.add_argument("--windows", type=int, default=SELECTION_WINDOWS[1])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokens = np.load(args.data / "heldout.npy", mmap_mode="r")
    layer_types = json.loads((args.delta / "config.json").read_text())["layer_types"]
    teacher = load_base("cpu", progress=lambda _: None)[0].to(device, dtype).eval()

    def cost(layer_map: str) -> tuple[float, float]:
        """(perplexity, log-perplexity increase over the dense teacher) of the teacher with `layer_map`."""
        value = heldout_perplexity(convert_llama(teacher, layer_map), tokens, 1024, args.windows, device,
                                   first=args.first_window)
        return value, math.log(value / teacher_ppl)

    teacher_ppl = heldout_perplexity(teacher, tokens, 1024, args.windows, device, first=args.first_window)
    layers = len(LayerMap.parse(layer_types))
    readers = [i for i, src in enumerate(LayerMap.parse(layer_types).sources) if src != i]
    whole_ppl, whole_cost = cost(layer_types)
    print(f"teacher {teacher_ppl:.2f}; teacher with the whole map {whole_ppl:.2f} "
          f"({len(readers)} layers share)", flush=True)
    single = []
    for layer in readers:
        alone = unshare(layer_types, set(range(layers)) - {layer})  # only this layer shares
        value, log_cost = cost(alone)
        single.append({"layer": layer, "ppl": value, "log_cost": log_cost})
        print(f"only layer {layer} sharing: {value:.2f} (+{log_cost:.4f} nats)", flush=True)
    ranked = [row["layer"] for row in sorted(single, key=lambda row: -row["log_cost"])]

    steps = []
    for count in range(1, min(args.max_layers, len(ranked)) + 1):
        own = set(ranked[:count])
        candidate = unshare(layer_types, own)
        value, log_cost = cost(candidate)
        kv_layers = len(LayerMap.parse(candidate).producers)
        steps.append({"own": sorted(own), "layer_types": candidate, "kv_layers": kv_layers, "ppl": value,
                      "log_cost": log_cost, "share_of_cost": log_cost / whole_cost})
        print(f"{count} layers unshared ({kv_layers} KV layers): {value:.2f}, "
              f"{log_cost / whole_cost:.1%} of the whole map's cost; {candidate}", flush=True)
    result = {"layer_types": layer_types, "teacher_ppl": teacher_ppl, "whole_map_ppl": whole_ppl,
              "windows": {"first": args.first_window, "count": args.windows, "length": 1024},
              "single": single, "cumulative": steps}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
