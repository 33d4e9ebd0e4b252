#!/usr/bin/env bash
# Issue 8 on 4 or 8 H200s, one device call: the transfer microbenchmark with several senders and
# receivers, then AFD with 1 expert GPU and 1..G-1 attention GPUs against colocated on G GPUs.
#   bash benchmarks/h200_scaling.sh            (G = the visible GPUs)
set -u
export AFDSERVE_COMMIT=${AFDSERVE_COMMIT:-unknown}
export PYTHONPATH=.
OUT=${OUT:-/tmp/afd_out}
mkdir -p "$OUT"
G=$(nvidia-smi -L | wc -l)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
H=$((G / 2))
[ -n "${SKIP_TRANSFER:-}" ] || \
python3 benchmarks/transfer.py --attn "$H" --experts "$H" --max-mb 16 --iters 50 --out "$OUT/transfer_${H}x${H}.json" \
  2>&1 | grep -v "ProcessGroupNCCL" | tee "$OUT/transfer_${H}x${H}.txt"
if [ -z "${LAYOUTS:-}" ]; then  # a call may take only 10 minutes: on 8 GPUs pass LAYOUTS in two halves
  for ((a = 1; a < G; a++)); do LAYOUTS="${LAYOUTS:-}${LAYOUTS:+,}afd:${a}x1:m3"; done
  LAYOUTS="$LAYOUTS,afd:$((G - 1))x1:m2,colocated:$G"
fi
python3 benchmarks/afd_e2e.py --out-dir "$OUT" --tag "${G}xH200" --layouts "$LAYOUTS" --batches "${BATCHES:-f0.25,f0.5,f1}" "$@" \
  2>&1 | grep -v "ProcessGroupNCCL" | tee "$OUT/afd_e2e.log"
