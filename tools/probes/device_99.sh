#!/bin/bash
# Stop 40, first call: build, the whole GPU suite (Shampoo's refresh threads with the fallback
# for a thread that cannot start; the Cholesky QR's last pass without a confirming Gram matrix),
# then bench --linalg's QR lines (Gram matrices per matrix). Run from the repository root on the
# device with carry ["build/deps","build/data","build/refs"]: bash tools/probes/device_99.sh
set -u
export OMP_NUM_THREADS=16
nvidia-smi --query-gpu=name --format=csv,noheader
( time make -j16 ) > $OUT/build.txt 2>&1 || { tail -30 $OUT/build.txt; exit 1; }
tail -3 $OUT/build.txt
timeout 300 build/bin/tests -tc='GPU*' > $OUT/gpu_tests.txt 2>&1; echo "GPU tests rc $?"
grep -E 'ERROR|FAILED' $OUT/gpu_tests.txt | head -20; tail -3 $OUT/gpu_tests.txt
grep -E 'Gram matrices' $OUT/gpu_tests.txt | head -40 > $OUT/gram_messages.txt
timeout 150 build/bin/bench --linalg > $OUT/linalg.txt 2>&1; echo "linalg rc $?"
grep -E '^QR' $OUT/linalg.txt | cut -c1-250
