#!/usr/bin/env bash
# Issue 7 on two H200s, one device call: the GPU tests of the multi-process layouts, then the
# transfer microbenchmark and the end-to-end decode benchmark (extra arguments go to afd_e2e.py).
#   bash benchmarks/h200_afd.sh --layouts afd:1x1:m1,afd:1x1:m2 --tag 2xH200
set -u
export AFDSERVE_COMMIT=${AFDSERVE_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
export PYTHONPATH=.
OUT=${OUT:-/tmp/afd_out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
if [ -z "${SKIP_TESTS:-}" ]; then
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/afd/test_gpu_layouts.py \
    tests/transport/test_torch_p2p.py -k "gpu or nccl" 2>&1 | tail -15
fi
python3 benchmarks/afd_e2e.py --out-dir "$OUT" "$@" 2>&1 | grep -v "^{" | tee "$OUT/afd_e2e.log"
