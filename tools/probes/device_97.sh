#!/bin/bash
# Stop 39: one block reduction (kernels/block_reduce.cuh) for the optimizers' kernels and the
# coupled Newton roots, with a NaN case for the roots. Run from the repository root on the
# device with carry ["build/deps","build/data"]: bash tools/probes/device_97.sh
set -u
export OMP_NUM_THREADS=16
nvidia-smi --query-gpu=name --format=csv,noheader
( time make -j16 ) > $OUT/build.txt 2>&1 || { tail -30 $OUT/build.txt; exit 1; }
tail -3 $OUT/build.txt
timeout 240 build/bin/tests -tc='GPU*' > $OUT/gpu_tests.txt 2>&1; echo "GPU tests rc $?"
grep -E 'ERROR|FAILED' $OUT/gpu_tests.txt | head -20; tail -3 $OUT/gpu_tests.txt
timeout 80 build/bin/bench --config gpt2-124m:32:1024 --optimizers adamw muon > $OUT/bench.txt 2>&1
echo "bench rc $?"; grep -E "optimizer " $OUT/bench.txt | cut -c1-200
