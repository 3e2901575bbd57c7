#!/bin/bash
# Stop 39's last call: the GPU cases that the final change touches (Shampoo's size 0 decomposed
# on the calling thread) on the final build; little device time was left. Run from the
# repository root on the device with carry ["build/deps","build/data"]: bash tools/probes/device_99.sh
set -u
export OMP_NUM_THREADS=16
nvidia-smi --query-gpu=name --format=csv,noheader
( time make -j16 build/bin/tests ) > $OUT/build.txt 2>&1 || { tail -30 $OUT/build.txt; exit 1; }
tail -3 $OUT/build.txt
timeout 90 build/bin/tests -tc='GPU Shampoo*,GPU optimizers*,GPU training*' > $OUT/gpu_tests.txt 2>&1; echo "GPU tests rc $?"
grep -E 'ERROR|FAILED' $OUT/gpu_tests.txt | head -20; tail -3 $OUT/gpu_tests.txt
