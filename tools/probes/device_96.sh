#!/bin/bash
# Stop 39, last call: the session's final build. The whole GPU suite, every comparison with the
# references, and Shampoo at lag 0 (sizes decomposed at once) and lag 9 (one after the other on
# its side stream again, with per-size buffers). Run from the repository root on the device with
# carry ["build/deps","build/data","build/refs"]: bash tools/probes/device_96.sh
source "$(dirname "$0")/device_common.sh"
device_build
gpu_suite 240
PYTHONUNBUFFERED=1 timeout 200 python3 tools/compare_optimizers.py --refs build/refs --device cuda --json $OUT/compare.json \
  > $OUT/compare.txt 2>&1
echo "compare rc $?"; grep -E "qopt (cpu|cuda)" $OUT/compare.txt | awk -F'->' '{print $2}' | sort | uniq -c
for lag in 0 9; do
  timeout 80 build/bin/bench --config gpt2-124m:32:1024 --optimizer shampoo --shampoo-refresh-lag $lag > $OUT/lag$lag.txt 2>&1
  echo "== lag $lag rc $?"; grep -E "optimizer |peak" $OUT/lag$lag.txt | cut -c1-260
done
