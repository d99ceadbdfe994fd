#!/usr/bin/env bash
# Stages of the default model's training on a lent GPU machine, each under 10 minutes.
# The base GGUF (98 MB) travels in two halves (.gguf_a/part, .gguf_b/part); everything lives in
# /tmp/lckv, which survives between calls while the machine stays warm.
#
#   stage-a : keep GGUF half A + held-out/stream text, install the gguf wheel (.whl); --tests runs the CPU tests
#   stage-b : join the GGUF, tokenize the corpora, sample teacher chats (--minutes)
#   train   : scripts/train_distill.py with the given arguments (resumes from /tmp/lckv/run/NAME)
#   refine DELTA NAME K1,K2 : rank DELTA's shared layers (scripts/choose_kv_sharing.py), then train from
#             DELTA, side by side, the maps where the K1 (K2, ...) costliest layers have their own KV
#   pick NAME DEST : copy the refined candidate with the fewest KV layers within 8% of the teacher on
#             the selection windows (2 points of margin for the 10% bound on held-out text)
set -euo pipefail
WORK=/tmp/lckv
# The repository root on the path: the scripts import lckv_stream from the checkout (nothing is installed there).
export LCKV_STREAM_CACHE=$WORK/cache PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
mkdir -p "$WORK/cache" "$WORK/text" "$WORK/data"
stage=$1; shift
case "$stage" in
  stage-a)
    cp .gguf_a/part "$WORK/gguf.a"
    cp .data/heldout.txt .data/stream.txt.xz "$WORK/text/"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    python3 -c "import torch, transformers, gguf; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
    if [ "${1:-}" = "--tests" ]; then python3 -m pytest -q -x -p no:cacheprovider tests 2>&1 | tail -3; fi
    ;;
  stage-b)
    cat "$WORK/gguf.a" .gguf_b/part > "$WORK/cache/SmolLM2-135M-Instruct.Q4_1.gguf"
    cp .data/train.txt.xz "$WORK/text/"
    python3 scripts/tokenize_corpora.py --text "$WORK/text" --out "$WORK/data"
    python3 scripts/sample_teacher_chats.py --out "$WORK/data/chats.npy" --rows 512 --length 2048 --batches 8 "$@"
    ;;
  train)
    name=$1; shift
    python3 scripts/train_distill.py --data "$WORK/data" --out "$WORK/run/$name" "$@"
    ;;
  refine)
    delta=$1; name=$2; counts=$3; shift 3
    run="$WORK/run/$name"
    mkdir -p "$run"
    python3 scripts/choose_kv_sharing.py --data "$WORK/data" --delta "$delta" --max-layers "${counts##*,}" \
        --out "$run/choice.json"
    for count in ${counts//,/ }; do  # the candidates train side by side on the one GPU
      map=$(python3 -c "import json, sys; print(json.load(open(sys.argv[1]))['cumulative'][int(sys.argv[2]) - 1]['layer_types'])" \
            "$run/choice.json" "$count")
      python3 scripts/train_distill.py --data "$WORK/data" --out "$run/own$count" --layer-types "$map" \
          --resume-delta "$delta" --export "$run/own$count/delta" "$@" > "$run/own$count.log" 2>&1 &
    done
    wait
    tail -n 2 "$run"/own*.log
    ;;
  pick)
    # The candidate with the fewest KV layers within 8% of the teacher on the selection windows. The
    # bound is 10% on held-out text; measured, a candidate's held-out ratio came out 0.004-0.009 above
    # its selection ratio, and the same candidate moved by 0.004 between runs: 1.10 let a map that
    # missed the bound on held-out text (1.097 selection, 1.103 held-out) through in one run of two.
    run="$WORK/run/$1"; dest=$2
    python3 - "$run" "$dest" <<'PY'
import json, shutil, sys
from pathlib import Path
run, dest = Path(sys.argv[1]), Path(sys.argv[2])
done = [json.loads(p.read_text()) | {"folder": str(p.parent)} for p in sorted(run.glob("own*/delta/train_state.json"))]
good = [s for s in done if s["select_ratio"] <= 1.08]
best = min(good, key=lambda s: s["kv_layers"]) if good else min(done, key=lambda s: s["select_ratio"])
for s in done:
    print(s["kv_layers"], "KV layers:", {k: s[k] for k in ("select_ratio", "ratio", "student_ppl", "teacher_ppl", "tokens")})
print("picked", best["folder"])
shutil.copytree(best["folder"], dest, dirs_exist_ok=True)
PY
    ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
