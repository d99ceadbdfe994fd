#!/usr/bin/env bash
# GPU checks that fit one 10-minute call each on a lent H100 (no model files needed: random weights).
#
#   tests : every GPU test (kernel against a float64 reference, kernel steps against SDPA, graph and
#           compiled step against eager, prefill graphs against eager prefill, the sampler graph against
#           the eager sampler, two sessions at once against each alone); about 7 minutes
#   speed : the sampler on the GPU, and time to first token with eager prefill (c) against prefill
#           graphs (d), results under OUT (default bench/results/gpu_checks); about 3 minutes
#   engine : the serving engine with compiled steps (classes 1, 8, 32, 64; compiled cold, about 5
#            minutes), the scheduler's ceiling, 1-64 conversations against the raw step, a profile of
#            the steps, 64 conversations x 500 turns, then a restart with the compile cache it
#            filled; about 10 minutes (JSON written after each part)
set -euo pipefail
# The repository root on the path: the benchmarks import lckv_stream from the checkout.
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
out=${OUT:-bench/results}/gpu_checks
case "${1:-}" in
  tests)
    python3 -m pytest -q -p no:cacheprovider -s tests/test_gpu.py 2>&1 | grep -v Warning
    ;;
  speed)
    mkdir -p "$out"
    python3 bench/bench_sampling.py --device cuda | tee "$out/sampling.txt"
    python3 bench/bench_decode.py --out "$out/ttft" --variants c_ours_eager d_ours_graph --lengths 1024 --batches 1
    ;;
  engine)
    python3 -m bench.bench_engine --model random --parts host concurrency profile soak start --no-mixed \
      --start-caches warm --compile-classes 1 8 32 64 --compile-timeout 400 --turns 500 \
      --out "$out/engine_compiled"
    ;;
  *)
    echo "usage: bash bench/gpu_checks.sh tests|speed|engine" >&2
    exit 2
    ;;
esac
