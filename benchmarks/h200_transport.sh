#!/usr/bin/env bash
# Issue 9 on two H200s (NVLink): the shared-slot transport's GPU tests, its transfer benchmark
# against NCCL (1x1, and 4x4 with two processes per GPU for protocol coverage), and the AFD
# end-to-end decode (the shared-slot transport's steps as CUDA graphs and eager; p2p runs eager:
# add LAYOUTS=afd:1x1:m1:p2p,... for it). Stages run in the order given (default: all):
#   bash benchmarks/h200_transport.sh tests transfer
#   LAYOUTS=afd:1x1:m1:ipc,afd:1x1:m1:p2p bash benchmarks/h200_transport.sh e2e
set -u
export AFDSERVE_COMMIT=${AFDSERVE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export PYTHONPATH=.
OUT=${OUT:-/tmp/afd_out}
TAG=${TAG:-2xH200}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
STAGES=${*:-tests transfer e2e}
for stage in $STAGES; do
  case $stage in
    tests)
      timeout 300 python3 -m pytest -q -p no:cacheprovider tests/transport/test_slots.py \
        tests/afd/test_gpu_layouts.py tests/afd/test_gpu_graphs.py -m gpu 2>&1 | tail -15 ;;
    transfer)
      timeout 200 python3 benchmarks/transfer.py --attn 1 --experts 1 --iters 200 \
        --out "$OUT/transfer_ipc_$TAG.json" 2>&1 | tail -80
      timeout 120 python3 benchmarks/transfer.py --attn 4 --experts 4 --max-mb 1 --iters 20 \
        --out "$OUT/transfer_ipc_4x4_shared_$TAG.json" 2>&1 | tail -12 ;;
    e2e)
      TJ=$OUT/transfer_ipc_$TAG.json
      [ -f "$TJ" ] || TJ=benchmarks/results/transfer_ipc_$TAG.json
      python3 benchmarks/afd_e2e.py --out-dir "$OUT" --tag "$TAG" --transfer-json "$TJ" --batches "${BATCHES:-max}" \
        --layouts "${LAYOUTS:-afd:1x1:m1:ipc,afd:1x1:m2:ipc,afd:1x1:m3:ipc,afd:1x1:m4:ipc,afd:1x1:m1:ipc:eager,afd:1x1:m2:ipc:eager}" 2>&1 \
        | grep -v "^{" | tee "$OUT/afd_e2e.log" | tail -40 ;;
  esac
done
