#!/bin/bash
# Stop 39, last call: the session's final build. The whole GPU suite, every comparison with the
# references, and Shampoo at lag 0 (sizes decomposed at once) and lag 9 (one after the other on
# its side stream again, with per-size buffers). Run from the repository root on the device with
# carry ["build/deps","build/data","build/refs"]: bash tools/probes/device_96.sh
set -u
export OMP_NUM_THREADS=16
nvidia-smi --query-gpu=name --format=csv,noheader
( time make -j16 ) > $OUT/build.txt 2>&1 || { tail -30 $OUT/build.txt; exit 1; }
tail -3 $OUT/build.txt
timeout 240 build/bin/tests -tc='GPU*' > $OUT/gpu_tests.txt 2>&1; echo "GPU tests rc $?"
grep -E 'ERROR|FAILED' $OUT/gpu_tests.txt | head -20; tail -3 $OUT/gpu_tests.txt
PYTHONUNBUFFERED=1 timeout 200 python3 tools/compare_optimizers.py --refs build/refs --device cuda --json $OUT/compare.json \
  > $OUT/compare.txt 2>&1
echo "compare rc $?"; grep -E "qopt (cpu|cuda)" $OUT/compare.txt | awk -F'->' '{print $2}' | sort | uniq -c
for lag in 0 9; do
  timeout 80 build/bin/bench --config gpt2-124m:32:1024 --optimizer shampoo --shampoo-refresh-lag $lag > $OUT/lag$lag.txt 2>&1
  echo "== lag $lag rc $?"; grep -E "optimizer |peak" $OUT/lag$lag.txt | cut -c1-260
done
