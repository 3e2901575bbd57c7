#!/bin/bash
# Stop 39's last call: the whole GPU suite on the final build (Shampoo's size 0 decomposed on the
# calling thread), and Shampoo's bench. Run from the repository root on the device with carry
# ["build/deps","build/data"]: bash tools/probes/device_99.sh
set -u
export OMP_NUM_THREADS=16
nvidia-smi --query-gpu=name --format=csv,noheader
( time make -j16 ) > $OUT/build.txt 2>&1 || { tail -30 $OUT/build.txt; exit 1; }
tail -3 $OUT/build.txt
timeout 200 build/bin/tests -tc='GPU*' > $OUT/gpu_tests.txt 2>&1; echo "GPU tests rc $?"
grep -E 'ERROR|FAILED' $OUT/gpu_tests.txt | head -20; tail -3 $OUT/gpu_tests.txt
timeout 70 build/bin/bench --config gpt2-124m:32:1024 --optimizer shampoo > $OUT/bench.txt 2>&1
echo "bench rc $?"; grep -E "optimizer |peak" $OUT/bench.txt | cut -c1-260
