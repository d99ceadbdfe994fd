#!/usr/bin/env bash
# Stages of the default model's training on a lent GPU machine, each under 10 minutes.
# The base GGUF (98 MB) travels in two halves (.gguf_a/part, .gguf_b/part); everything lives in
# /tmp/lckv, which survives between calls while the machine stays warm.
#
#   stage-a : keep GGUF half A + held-out/stream text, install the gguf wheel (.whl), run the CPU tests
#   stage-b : join the GGUF, tokenize the corpora, sample teacher chats (--minutes)
#   train   : scripts/train_distill.py with the given arguments (resumes from /tmp/lckv/run/NAME)
set -euo pipefail
WORK=/tmp/lckv
export LCKV_STREAM_CACHE=$WORK/cache PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
mkdir -p "$WORK/cache" "$WORK/text" "$WORK/data"
stage=$1; shift
case "$stage" in
  stage-a)
    cp .gguf_a/part "$WORK/gguf.a"
    cp .data/heldout.txt .data/stream.txt.xz "$WORK/text/"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    python3 -c "import torch, transformers, gguf; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
    python3 -m pytest -q -x -p no:cacheprovider tests 2>&1 | tail -3
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
  *) echo "unknown stage $stage"; exit 2 ;;
esac
