#!/bin/bash
# Stop 39, first call: the whole GPU suite on this session's build (the Newton-Schulz products
# refactor of stop 38 had not run on a GPU; Shampoo's sizes decomposed at once; SideStream from
# any stream; NaN-propagating min/max reductions), and the Shampoo comparisons with the reference.
# Run from the repository root on the device with carry ["build/deps","build/data","build/refs"]:
# bash tools/probes/device_93.sh
source "$(dirname "$0")/device_common.sh"
device_build
gpu_suite 330
PYTHONUNBUFFERED=1 timeout 150 python3 tools/compare_optimizers.py --refs build/refs --device cuda --json $OUT/compare.json \
  --optimizers shampoo shampoo_momentum shampoo_options > $OUT/compare.txt 2>&1
echo "compare rc $?"; grep -E "qopt (cpu|cuda)" $OUT/compare.txt | cut -c1-200
