"""Decode speed and memory, side by side in one run on the same weights (GPU).

Variants, all bf16, batch 1 unless said, SmolLM2-135M architecture with random weights:
  (a) transformers eager, DynamicCache (dense)
  (b) transformers StaticCache, decode step captured by hand in a CUDA graph (dense)
  (c) ours, eager, sink + window cache, the default model's layer map
  (d) ours, CUDA graph, same map
  (e) ours as the engine runs it on a GPU: fused q/k/v and gate/up weights, the step compiled
      (TorchInductor) then captured in a CUDA graph; (e*) the same with the LCKV 1+1 map (3 KV layers)
  (f) ours, the step as fused Triton kernels (`fused_step.py`) captured in a CUDA graph: one
      persistent kernel a step, or five kernels a layer; batch 1 and 8
Ours use the engine's default cache (sink + window of `CacheSettings`) and, on CUDA, the Triton
decode-attention kernel (LCKV_DECODE_KERNEL=0: the portable attention instead).
For each: ms/token at conversation lengths 1k, 8k, 64k, 1M (dense variants stop past the trained
context, 8,192), KV cache MB, peak GPU MB, time to first token of a 100-token turn after 1k tokens
(eager prefill for (a), for (b) into its StaticCache, and for (c); prefill chunks replayed as CUDA
graphs for (d), as the engine encodes a turn).
Then aggregate tokens/s at 1, 8, 32, 64 concurrent sequences for (b), (d) and (e), at 1 and 8 for (f).

    python bench/bench_decode.py --out bench/results/decode
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache
from transformers.cache_utils import DynamicCache

from lckv_stream import lckv_map
from lckv_stream.convert import convert_llama
from lckv_stream.decoding import EagerDecoder, GraphDecoder
from lckv_stream.default_model import default_layer_types
from lckv_stream.chat import CacheSettings
from lckv_stream.fused_step import FusedStep
from lckv_stream.fusion import fuse_projections

LENGTHS = [1024, 8192, 65536, 1 << 20]
TRAINED_CONTEXT = 8192
SINK, WINDOW = CacheSettings().sink, CacheSettings().window
VOCAB = 49152


def smollm_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=TRAINED_CONTEXT,
        rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
    )


def timed_ms(step, steps: int, warmup: int = 10) -> float:
    """Mean ms of `step()` over `steps` calls, timed with CUDA events after a warm-up."""
    for _ in range(warmup):
        step()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(steps):
        step()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / steps


def random_ids(batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), device="cuda")


def kv_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values)
               if t is not None)


# ---- transformers baselines -----------------------------------------------------------------------
@torch.inference_mode()
def hf_eager(model, length: int, steps: int) -> dict:
    torch.cuda.reset_peak_memory_stats()
    cache = DynamicCache(config=model.config)
    model(random_ids(1, length), past_key_values=cache, use_cache=True)
    token = random_ids(1, 1)
    ms = timed_ms(lambda: model(token, past_key_values=cache, use_cache=True), steps)
    # the timed steps grew the cache by warm-up + steps tokens; report the size at `length`
    per_token = kv_bytes(cache) / cache.get_seq_length()
    return {"ms_per_token": ms, "kv_mb": per_token * length / 2**20, "peak_mb": torch.cuda.max_memory_allocated() / 2**20}


class HFGraphStep:
    """transformers' StaticCache decode step, captured by hand in a CUDA graph."""

    def __init__(self, model, batch: int, length: int, extra: int) -> None:
        self.cache = StaticCache(config=model.config, max_cache_len=length + extra)
        model(random_ids(batch, length), past_key_values=self.cache, use_cache=True,
              cache_position=torch.arange(length, device="cuda"))
        self.ids = random_ids(batch, 1)
        self.position = torch.tensor([length], device="cuda")
        run = lambda: model(self.ids, past_key_values=self.cache, use_cache=True,  # noqa: E731
                            cache_position=self.position, position_ids=self.position.expand(batch, 1)).logits
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = run()

    def step(self) -> None:
        # transformers advances its own write position on every replay: `extra` leaves room for them.
        self.graph.replay()


@torch.inference_mode()
def hf_graph(model, length: int, steps: int, batch: int = 1) -> dict:
    torch.cuda.reset_peak_memory_stats()
    runner = HFGraphStep(model, batch, length, extra=256)
    ms = timed_ms(runner.step, steps)
    return {"ms_per_token": ms, "kv_mb": kv_bytes(runner.cache) / 2**20,
            "peak_mb": torch.cuda.max_memory_allocated() / 2**20}


# ---- ours ---------------------------------------------------------------------------------------
@torch.inference_mode()
def fill(model, cache, length: int, chunk: int = 4096) -> None:
    """Bring the cache to stream position `length`. Up to 64k tokens are really encoded; beyond, the
    sinks and the last window are encoded at their true stream indices (what a cache holds there)."""
    batch = cache.batch_size
    if length <= 65536:
        for start in range(0, length, chunk):
            model(random_ids(batch, min(chunk, length - start)), cache)
        return
    model(random_ids(batch, SINK), cache)
    cache.seen.fill_(length - WINDOW)
    for start in range(0, WINDOW, chunk):
        model(random_ids(batch, min(chunk, WINDOW - start)), cache)


@torch.inference_mode()
def ours(model, length: int, steps: int, graph: bool, batch: int = 1, compile: bool = False,
         fused_mode: str | None = None) -> dict:
    torch.cuda.reset_peak_memory_stats()
    cache = model.new_cache(SINK, WINDOW, batch_size=batch)
    fill(model, cache, length)
    began = time.perf_counter()
    if fused_mode is not None:
        decoder = GraphDecoder(model, cache, step_function=FusedStep(model, cache, mode=fused_mode))
    else:
        decoder = GraphDecoder(model, cache, compile=compile) if graph else EagerDecoder(model, cache)
    setup_s = time.perf_counter() - began
    token = random_ids(batch, 1)
    ms = timed_ms(lambda: decoder.step(token), steps)
    return {"ms_per_token": ms, "kv_mb": cache.allocated_bytes / 2**20,
            "peak_mb": torch.cuda.max_memory_allocated() / 2**20, "seen": cache.tokens_seen(),
            "decoder_setup_s": setup_s}


@torch.inference_mode()
def ttft(prefill_and_first, repeats: int = 5) -> float:
    """ms from a 100-token turn's arrival to its first token, after 1,024 tokens of conversation
    (median of `repeats`, after one untimed run that captures or loads what the first one needs)."""
    prefill_and_first()()
    times = []
    for _ in range(repeats):
        setup = prefill_and_first()
        torch.cuda.synchronize()
        begin = time.perf_counter()
        setup()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - begin) * 1e3)
    return sorted(times)[len(times) // 2]


def ttft_hf(model, static: bool = False):
    """transformers' prefill of the turn, into its default cache or (`static`) a StaticCache."""
    def prepare():
        cache = StaticCache(config=model.config, max_cache_len=1124) if static else DynamicCache(config=model.config)
        model(random_ids(1, 1024), past_key_values=cache, use_cache=True,
              cache_position=torch.arange(1024, device="cuda"))
        turn, position = random_ids(1, 100), torch.arange(1024, 1124, device="cuda")
        return lambda: model(turn, past_key_values=cache, use_cache=True, cache_position=position,
                             logits_to_keep=1).logits[:, -1].argmax(-1).item()
    return ttft(prepare)


def ttft_ours(model, prefill_graphs: bool = False):
    """Eager prefill, or chunks of fixed sizes replayed as CUDA graphs (`GraphDecoder(prefill_graphs=True)`)."""
    cache = model.new_cache(SINK, WINDOW)
    decoder = GraphDecoder(model, cache, prefill_graphs=True) if prefill_graphs else EagerDecoder(model, cache)

    def prepare():
        cache.reset()
        fill(model, cache, 1024)
        turn = random_ids(1, 100)
        return lambda: decoder.prefill(turn).argmax(-1).item()
    return ttft(prepare)


def fused(model):
    fuse_projections(model)
    return model


VARIANTS = ("a_hf_eager", "b_hf_static_graph", "c_ours_eager", "d_ours_graph", "e_ours_compiled_graph",
            "e_ours_compiled_graph_lckv_w2", "f_ours_fused_persistent", "f_ours_fused_layers")
FUSED_BATCHES = (1, 8)  # the rows the fused step serves (fused_step.MAX_ROWS)
BATCHES = (1, 8, 32, 64)


def run_variant(name: str, steps: int, lengths: list[int], batches: tuple[int, ...]) -> dict:
    """Latency rows (and batch throughput / TTFT where the variant has them) of one variant."""
    torch.manual_seed(0)
    dense = LlamaForCausalLM(smollm_config()).to("cuda", torch.bfloat16).eval()
    model = {
        "c_ours_eager": lambda: convert_llama(dense, default_layer_types()),
        "d_ours_graph": lambda: convert_llama(dense, default_layer_types()),
        "e_ours_compiled_graph": lambda: fused(convert_llama(dense, default_layer_types())),
        "e_ours_compiled_graph_lckv_w2": lambda: fused(convert_llama(dense, lckv_map(30, 1, 1))),
        "f_ours_fused_persistent": lambda: fused(convert_llama(dense, default_layer_types())),
        "f_ours_fused_layers": lambda: fused(convert_llama(dense, default_layer_types())),
    }.get(name, lambda: dense)().eval()
    measure = {
        "a_hf_eager": lambda n, b: hf_eager(model, n, 50),
        "b_hf_static_graph": lambda n, b: hf_graph(model, n, steps, batch=b),
        "c_ours_eager": lambda n, b: ours(model, n, 50, graph=False),
        "d_ours_graph": lambda n, b: ours(model, n, steps, graph=True, batch=b),
        "e_ours_compiled_graph": lambda n, b: ours(model, n, steps, graph=True, batch=b, compile=True),
        "e_ours_compiled_graph_lckv_w2": lambda n, b: ours(model, n, steps, graph=True, compile=True),
        "f_ours_fused_persistent": lambda n, b: ours(model, n, steps, graph=True, batch=b, fused_mode="persistent"),
        "f_ours_fused_layers": lambda n, b: ours(model, n, steps, graph=True, batch=b, fused_mode="layers"),
    }[name]
    result: dict = {"variant": name, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    "cache": {"sink": SINK, "window": WINDOW}, "latency": {},
                    "decode_kernel": os.environ.get("LCKV_DECODE_KERNEL", "1") != "0"}
    if name.startswith("f_"):
        from lckv_stream import fused_step
        result["fused"] = {"products": fused_step.PRODUCTS,
                           "tiles": [fused_step.HALF_TILE, fused_step.ROW_TILE, fused_step.HEAD_TILE]}
    for length in lengths:
        if name.startswith(("a_", "b_")) and length > TRAINED_CONTEXT:
            result["latency"][str(length)] = None  # past the trained context: dense baselines stop
            continue
        result["latency"][str(length)] = measure(length, 1)
        print(name, length, {k: round(v, 3) for k, v in result["latency"][str(length)].items()}, flush=True)
        torch.cuda.empty_cache()
    if name == "a_hf_eager":
        result["ttft_ms"] = ttft_hf(model)
    if name == "b_hf_static_graph":
        result["ttft_ms"] = ttft_hf(model, static=True)
    if name == "c_ours_eager":
        result["ttft_ms"] = ttft_ours(model)
    if name == "d_ours_graph":
        result["ttft_ms"] = ttft_ours(model, prefill_graphs=True)
    if name in ("b_hf_static_graph", "d_ours_graph", "e_ours_compiled_graph") or name.startswith("f_"):
        result["batch"] = {}
        for batch in (FUSED_BATCHES if name.startswith("f_") else batches):
            row = measure(1024, batch)
            row["tokens_per_s"] = batch * 1e3 / row["ms_per_token"]
            result["batch"][str(batch)] = row
            print(name, "batch", batch, round(row["tokens_per_s"]), flush=True)
            torch.cuda.empty_cache()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for one JSON file per variant")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS),
                        help="variants to run, each in its own process")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # one, in this process
    parser.add_argument("--lengths", nargs="+", type=int, default=LENGTHS)
    parser.add_argument("--batches", nargs="+", type=int, default=list(BATCHES))
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--table", action="store_true", help="only print the table of the JSON files in --out")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.table:
        print_table(args.out)
        return
    if args.variant:
        result = run_variant(args.variant, args.steps, args.lengths, tuple(args.batches))
        (args.out / f"{args.variant}.json").write_text(json.dumps(result, indent=1))
        return
    # One process per variant: a failing kernel in one (a device-side assert) cannot spoil the others.
    import subprocess

    for name in args.variants:
        done = subprocess.run([sys.executable, __file__, "--out", str(args.out), "--variant", name,
                               "--steps", str(args.steps), "--lengths", *map(str, args.lengths),
                               "--batches", *map(str, args.batches)])
        if done.returncode:
            (args.out / f"{name}.json").write_text(json.dumps({"variant": name, "error": done.returncode}))
    print_table(args.out)


def print_table(folder: Path) -> None:
    """ms/token per conversation length and tokens/s per batch size of every variant in `folder`."""
    results = [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
    lengths = sorted({int(n) for r in results for n in r.get("latency", {})})
    batches = sorted({int(b) for r in results for b in r.get("batch", {})})
    header = ["variant", *(f"{n:,} ms" for n in lengths), "KV MB", "TTFT ms", *(f"tok/s x{b}" for b in batches)]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in results:
        if "error" in r:
            print(f"| {r['variant']} | failed (exit {r['error']}) |")
            continue
        rows = r["latency"]
        cells = [f"{rows[str(n)]['ms_per_token']:.3f}" if rows.get(str(n)) else "—" for n in lengths]
        kv = next((row["kv_mb"] for row in rows.values() if row), float("nan"))
        throughput = [f"{r['batch'][str(b)]['tokens_per_s']:,.0f}" if str(b) in r.get("batch", {}) else ""
                      for b in batches]
        first = f"{r['ttft_ms']:.1f}" if "ttft_ms" in r else ""
        print("| " + " | ".join([r["variant"], *cells, f"{kv:.1f}", first, *throughput]) + " |")


if __name__ == "__main__":
    main()
