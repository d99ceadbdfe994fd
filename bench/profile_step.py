"""Where the time of one decode step goes: CUDA kernels of the (compiled) step, by total time (GPU).

    python bench/profile_step.py [--layer-map cla2|lckv2] [--batch 1] [--window 4092] [--fuse] [--no-gemv]
                                 [--no-compile] [--fused-step persistent|layers]
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from torch.profiler import ProfilerActivity, profile

from bench_decode import SINK, WINDOW, fill, random_ids, smollm_config, timed_ms
from transformers import LlamaForCausalLM

from lckv_stream import cla_map, lckv_map
from lckv_stream.default_model import default_layer_types
from lckv_stream.convert import convert_llama
from lckv_stream.decoding import GraphDecoder
from lckv_stream.fused_step import FusedStep
from lckv_stream.fusion import fuse_projections


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layer-map", choices=("default", "cla2", "lckv2"), default="default")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--window", type=int, default=WINDOW)
    parser.add_argument("--fuse", action="store_true", help="fused q/k/v and gate/up weights")
    parser.add_argument("--no-gemv", action="store_true",
                        help="compile without coordinate-descent tuning (one-row products through cuBLAS)")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--fused-step", choices=("persistent", "layers"),
                        help="the step as fused Triton kernels (fused_step.py) instead of compiled")
    args = parser.parse_args()
    torch.manual_seed(0)
    dense = LlamaForCausalLM(smollm_config()).to("cuda", torch.bfloat16).eval()
    layer_map = {"default": default_layer_types(), "cla2": cla_map(30, 2), "lckv2": lckv_map(30, 1, 1)}[args.layer_map]
    model = convert_llama(dense, layer_map).eval()
    if args.fuse or args.fused_step:
        fuse_projections(model)
    cache = model.new_cache(SINK, args.window, batch_size=args.batch)
    fill(model, cache, 1024)
    began = time.perf_counter()
    options = {} if args.no_gemv else None
    if args.fused_step:
        decoder = GraphDecoder(model, cache, step_function=FusedStep(model, cache, mode=args.fused_step))
    else:
        decoder = GraphDecoder(model, cache, compile=not args.no_compile, compile_options=options)
    setup_s = time.perf_counter() - began
    token = random_ids(args.batch, 1)
    replay_ms = timed_ms(lambda: decoder.step(token), 300)
    step = decoder.ungraphed_step
    for _ in range(5):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            step()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    total_us = sum(e.self_device_time_total for e in events) / 10
    launches = sum(e.count for e in events) / 10
    label = (f"{args.layer_map} batch {args.batch} window {args.window} fuse={args.fuse} "
             f"fused_step={args.fused_step} "
             f"gemv={not args.no_gemv} kernel={os.environ.get('LCKV_DECODE_KERNEL', '1')}")
    print(f"{label}: graph replay {replay_ms:.3f} ms/step, {launches:.0f} kernels, "
          f"{total_us:.0f} us of kernel time per step; setup {setup_s:.0f} s")
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=70))


if __name__ == "__main__":
    main()
