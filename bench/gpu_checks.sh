#!/usr/bin/env bash
# GPU checks that fit one 10-minute call each on a lent H100 (no model files needed: random weights).
#
#   tests : every GPU test but the side compiler's (kernel against a float64 reference, kernel steps against SDPA, graph
#           and compiled step against eager, prefill graphs against eager prefill, the sampler graph
#           against the eager sampler, two sessions at once against each alone); about 7 minutes
#   tests-compile : the side compiler's steps, sampler and prefill chunks in an engine, and the chunk
#           compile alone after two steps; about 6 minutes
#   speed : the sampler on the GPU, and time to first token with eager prefill (c) against prefill
#           graphs (d), results under OUT (default bench/results/gpu_checks); about 3 minutes
#   engine : the serving engine with compiled steps (classes 1, 8, 32, 64; compiled cold, about 5
#            minutes), the scheduler's ceiling, 1-64 conversations against the raw step, a profile of
#            the steps (JSON written after each part), then the engine's GPU tests; about 9 minutes.
#            The compile cache it fills is copied to OUT/inductor.tar.gz for the next mode.
#            LCKV_WHOLE_STEP_GRAPH=1 in the environment measures the engine with each step in one graph.
#   engine-restart : run right after `engine` on the same machine (or with OUT/inductor.tar.gz
#            unpacked into ~/.cache/lckv-stream/inductor): engine start to first token with that
#            warm compile cache, then 64 conversations x 500 turns; about 8 minutes
#   soak : 64 conversations x 500 turns alone, after compiling the four classes cold (about 4
#          minutes); cut after SOAK_S seconds (default 300), reporting the turns every one finished.
#          CLASSES="64" compiles the one class 64 rows step in (a cold machine's one call)
#   reads : what one row's read costs, plain graphs, then after compiling the steps and the prefill
#           chunks cold (about 8 minutes); it fills the compile cache (/tmp/torchinductor_*), so
#           `engine` or `soak` run next on the same warm machine compile in seconds
#   fused-tests : the fused decode step's GPU tests (tests/test_gpu.py -k fused)
#   fused-bench : bench_decode's compiled step (e) against the fused step (f, persistent and layers)
#           in one run, 1k to 1M tokens and batch 1 and 8, then the kernels per step of the fused
#           ones (profile_step.py); about 8 minutes
#   fused-tiles : the fused step's ways of reading inputs and its tiles side by side
#           (CONFIGS="whole:16,16,16 chunks:16,16,64"), then its GPU tests with the first; about 6 minutes
#   fused-products : one product as Triton kernels four ways (the step's chunk loop, unrolled, one
#           whole-width load, split over the inputs) against cuBLAS, and the grid barrier's cost; 2 minutes
#   first : a fresh machine's first call: the GPU tests of `tests` in a second process while
#           `reads --compile` fills the compile cache (the compile is host work); logs under OUT;
#           the compile and fused tests are left to `tests-compile` and `fused-tests`
#   short : one call's worth when only one is left: resume (plain graphs), a profiled read, then the
#           GPU tests of `tests` until CALL_S (570) seconds from the start
#   resume-soak : on the machine `first` warmed: resume (1,000 open conversations of 1,028 tokens,
#           then of 8), then 64 conversations x 500 turns until WALL_S (575) seconds from the start
#   serve : on the machine `first` warmed: 1,000 open conversations holding 8 tokens each, then
#           1,000 holding 1,028 (resume), then 1-64 conversations against the raw step and once in
#           mixed buckets (last: their new buckets compile on the side); about 5 minutes. The soak is
#           a call of its own: SOAK_S=470 bash bench/gpu_checks.sh soak (500 turns: about 430 s at the
#           75 turns/s of 2026-12-07)
# The steps and the prefill chunks compile on the side (steps first): cold, `engine` and `soak`
# wait about 8 minutes for both; run `reads` (or `first`) first on the machine, or set LCKV_COMPILE_PREFILL=0.
set -euo pipefail
# The repository root on the path: the benchmarks import lckv_stream from the checkout.
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
out=${OUT:-bench/results}/gpu_checks
# A compile cache from an earlier machine of this kind (`first` returns it in parts): unpacked once.
cache=$(python3 -c 'from lckv_stream.base_model import cache_dir; print(cache_dir())')
if [ -d .inductor_parts ] && [ ! -d "$cache/inductor" ]; then
  mkdir -p "$cache" && cat .inductor_parts/inductor.tar.gz.part* | tar -xzf - -C "$cache" && echo "compile cache unpacked from .inductor_parts"
fi
case "${1:-}" in
  tests)
    # Two calls' worth: every test but the side compiler's here, those (about 6 minutes) in tests-compile.
    python3 -m pytest -q -p no:cacheprovider -s --durations=0 tests/test_gpu.py -k "not compiles_on_the_side and not prefill_chunks_compile and not fused" 2>&1 | grep -v Warning
    ;;
  tests-compile)
    python3 -m pytest -q -p no:cacheprovider -s --durations=0 tests/test_gpu.py -k "compiles_on_the_side or prefill_chunks_compile" 2>&1 | grep -v Warning
    ;;
  speed)
    mkdir -p "$out"
    python3 bench/bench_sampling.py --device cuda | tee "$out/sampling.txt"
    python3 bench/bench_decode.py --out "$out/ttft" --variants c_ours_eager d_ours_graph --lengths 1024 --batches 1
    ;;
  engine)
    python3 -m bench.bench_engine --model random --parts host concurrency profile --no-mixed \
      --compile-classes 1 8 32 64 --compile-timeout 400 --out "$out/engine_compiled"
    tar -czf "$out/inductor.tar.gz" -C "$cache" inductor || true
    timeout 150 python3 -m pytest -q -p no:cacheprovider -s tests/test_gpu.py \
      -k "engine_graphs or prefill_graphs_and_offload or two_sessions or read_together or compiled_sampler" 2>&1 | grep -v Warning
    ;;
  engine-restart)
    python3 -m bench.bench_engine --model random --parts start soak --start-caches warm \
      --compile-classes 1 8 32 64 --turns 500 --out "$out/engine_restart"
    ;;
  fused-tests)
    timeout 560 python3 -m pytest -q -p no:cacheprovider -s --durations=0 tests/test_gpu.py -k fused 2>&1 | grep -v Warning
    ;;
  fused-bench)
    mkdir -p "$out"
    python3 bench/bench_decode.py --out "$out/fused_decode" --variants e_ours_compiled_graph f_ours_fused_persistent f_ours_fused_layers --batches 1 8 2>&1 | tee "$out/fused_decode_log.txt"
    for mode in persistent layers; do
      timeout 120 python3 bench/profile_step.py --fused-step $mode --rows 12 2>&1 | tee -a "$out/fused_profile_log.txt"
    done
    ;;
  fused-tiles)
    # The fused step's ways of reading a product's inputs and its output tiles side by side
    # (CONFIGS of products:half,row,head; LCKV_FUSED_PRODUCTS, LCKV_FUSED_TILES), the persistent
    # kernel at 1k and 1M tokens, batch 1 and 8; then the fused GPU tests with the first config.
    mkdir -p "$out"
    configs=${CONFIGS:-chunks:16,16,64 whole:16,16,16 whole:16,16,64 whole:8,8,16}
    for config in $configs; do
      products=${config%%:*}; tiles=${config#*:}
      LCKV_FUSED_PRODUCTS=$products LCKV_FUSED_TILES=$tiles timeout 120 python3 bench/bench_decode.py \
        --out "$out/fused_tiles_${products}_${tiles//,/_}" --variants f_ours_fused_persistent \
        --lengths 1024 1048576 --batches 1 8 2>&1 | grep "^f_" | sed "s/^/$config: /" | tee -a "$out/fused_tiles_log.txt"
    done
    first=${configs%% *}
    LCKV_FUSED_PRODUCTS=${first%%:*} LCKV_FUSED_TILES=${first#*:} timeout 200 python3 -m pytest -q -p no:cacheprovider -s \
      tests/test_gpu.py -k fused 2>&1 | grep -v Warning | tail -15
    ;;
  fused-products)
    mkdir -p "$out"
    python3 bench/fused_products.py --out "$out/fused_products.json" 2>&1 | grep -v Warning | tee "$out/fused_products_log.txt"
    ;;
  first)
    mkdir -p "$out"
    # Not the compile tests: two processes compiling at once both miss the call's time (2026-12-07).
    ( timeout 570 python3 -m pytest -q -p no:cacheprovider -s --durations=0 tests/test_gpu.py \
        -k "not compiles_on_the_side and not prefill_chunks_compile and not fused" >"$out/tests_log.txt" 2>&1
      echo "tests exit $?" >>"$out/tests_log.txt" ) &
    timeout 570 python3 bench/read_cost.py --compile --profile 2>&1 | tee "$out/reads_log.txt" || true
    wait
    # The filled compile cache comes back in parts of 15 MB (what one call returns per file): carried
    # as .inductor_parts/ to a later machine of the same kind, it spares the cold compile.
    tar -czf - -C "$cache" inductor \
      | split -b 15m -d - "$out/inductor.tar.gz.part" || true
    grep -v Warning "$out/tests_log.txt" | tail -60
    ;;
  serve)
    mkdir -p "$out"
    python3 -m bench.bench_engine --model random --parts resume concurrency \
      --compile-classes 1 8 32 64 --out "$out/engine_serve" 2>&1 | tee "$out/serve_log.txt"
    ;;
  reads)
    python3 bench/read_cost.py
    python3 bench/read_cost.py --compile
    ;;
  short)
    # One call when the session has time for one: resume of 1,000 open conversations (plain graphs:
    # resume moves a row and runs no step), what a read costs (plain graphs, profiled), then every
    # GPU test but the compile and fused ones until the call's time is up (-v: each result as it ends).
    mkdir -p "$out"
    LCKV_COMPILE=0 timeout 170 python3 -m bench.bench_engine --model random --parts resume \
      --out "$out/engine_resume_plain" 2>&1 | grep -v Warning | tee "$out/resume_log.txt" || true
    timeout 80 python3 bench/read_cost.py --profile 2>&1 | grep -v Warning | tee "$out/reads_log.txt" || true
    timeout $((${CALL_S:-570} - SECONDS)) python3 -m pytest -v -p no:cacheprovider -s --durations=0 tests/test_gpu.py \
      -k "not compiles_on_the_side and not prefill_chunks_compile and not fused" 2>&1 | grep -v Warning > "$out/tests_log.txt" || true
    grep -E "PASSED|FAILED|ERROR|passed|failed|error" "$out/tests_log.txt" | tail -40
    ;;
  resume-soak)
    # On the machine `first` warmed (its compile cache): resume of 1,000 open conversations, then the
    # soak until the call's 590 s are nearly up (the turns every conversation finished are reported).
    python3 -m bench.bench_engine --model random --parts resume soak --open-tokens ${OPEN_TOKENS:-1028 8} \
      --compile-classes 1 8 32 64 --turns 500 --wall-seconds "${WALL_S:-575}" --out "$out/engine_resume_soak" 2>&1 | tee "$out/resume_soak_log.txt"
    ;;
  soak)
    python3 -m bench.bench_engine --model random --parts soak --compile-classes ${CLASSES:-1 8 32 64} --turns 500 \
      --soak-seconds "${SOAK_S:-300}" --out "$out/engine_soak"
    ;;
  *)
    echo "usage: bash bench/gpu_checks.sh fused-tests|fused-bench|fused-tiles|fused-products|first|short|serve|resume-soak|tests|tests-compile|speed|engine|engine-restart|soak|reads" >&2
    exit 2
    ;;
esac
