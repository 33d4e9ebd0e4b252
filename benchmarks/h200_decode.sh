#!/usr/bin/env bash
# Issue 6 on one H200: the GPU kernel tests, where a step's time goes (all 48 layers, host phases,
# GPU busy fraction, kernels by kind, prefill), and the end-to-end decode of Qwen3-30B-A3B against
# transformers. Stages run in the order given (default: all); env CONC, OUTPUT_LEN, HF_CONC (empty:
# no transformers run), HF_OUTPUT_LEN, MODES (async,sync: both scheduling modes side by side), PROFILE_CONC, TESTS, TAG.
#   bash benchmarks/h200_decode.sh tests profile
set -u
export AFDSERVE_COMMIT=${AFDSERVE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export PYTHONPATH=.
OUT=${OUT:-/tmp/afd_out}
TAG=${TAG:-h200}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
for stage in ${*:-tests profile e2e}; do
  case $stage in
    tests)
      timeout 300 python3 -m pytest -q -p no:cacheprovider ${TESTS:-tests/kernels tests/transport/test_slots.py} -m gpu 2>&1 \
        | tail -8 ;;
    profile)
      timeout 300 python3 benchmarks/profile_decode.py --layers 48 --concurrency "${PROFILE_CONC:-1,10,32}" --prefill \
        --out "$OUT/profile_decode_$TAG.json" > "$OUT/profile_decode_$TAG.txt" 2>&1
      grep -A20 '^ conc' "$OUT/profile_decode_$TAG.txt"; grep '^prefill' "$OUT/profile_decode_$TAG.txt" ;;
    e2e)
      timeout 560 python3 benchmarks/e2e_decode.py --out "$OUT/e2e_decode_$TAG.json" --concurrency "${CONC-1,10,32,64,128,256}" \
        --output-len "${OUTPUT_LEN:-1024}" --hf-concurrency "${HF_CONC-32}" --hf-output-len "${HF_OUTPUT_LEN:-32}" --modes "${MODES:-async}" 2>&1 \
        | grep -v '^{' | tail -12 ;;
  esac
done
