#!/bin/bash
# Stop 38's first call: the whole GPU suite on the final build of stop 37 (its two last review
# mends never ran on a GPU), the comparison with the reference implementations, and the six
# optimizers' speed on gpt2-124m 32 x 1024 (bench defaults: 12 warm-up steps, mean over 20).
# Run from the repository root on the device with carry ["build/deps","build/data","build/refs"]:
#   bash tools/probes/device_86.sh
source "$(dirname "$0")/device_common.sh"
device_build
timeout 240 build/bin/tests -tc='GPU*' > $OUT/gpu_tests.txt 2>&1; echo "GPU tests rc $?"
grep -E 'ERROR|FAILED' $OUT/gpu_tests.txt | head -20
tail -4 $OUT/gpu_tests.txt
if [ -d build/refs ]; then
  PYTHONUNBUFFERED=1 timeout 150 python3 tools/compare_optimizers.py --refs build/refs --device cuda --json $OUT/compare.json \
    > $OUT/compare.txt 2>&1
  echo "compare rc $?"; cut -c1-200 $OUT/compare.txt | tail -25
fi
timeout 150 build/bin/bench --config gpt2-124m:32:1024 --optimizers adamw muon scion shampoo soap psgd > $OUT/bench.txt 2>&1
echo "bench rc $?"; grep -iE 'optimizer step|tokens/s|fwd|peak' $OUT/bench.txt | cut -c1-260 | head -30
