#!/bin/bash
# Stop 42: every comparison with the published references (tools/compare_optimizers.py, CPU and
# GPU replays) on the final tree; the last full run was stop 39's, before the Cholesky QR's
# unconfirmed last pass, Shampoo's refresh threads and the shared block reductions.
# Carry ["build/deps","build/data","build/refs"]: bash tools/probes/device_106.sh
source "$(dirname "$0")/device_common.sh"
device_build
PYTHONUNBUFFERED=1 timeout 400 python3 tools/compare_optimizers.py --refs build/refs --device cuda --json $OUT/compare.json \
  > $OUT/compare.txt 2>&1
echo "compare rc $?"; tail -60 $OUT/compare.txt | cut -c1-220
