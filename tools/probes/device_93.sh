#!/bin/bash
# Stop 39, first call: the whole GPU suite on this session's build (the Newton-Schulz products
# refactor of stop 38 had not run on a GPU; Shampoo's sizes decomposed at once; SideStream from
# any stream; NaN-propagating min/max reductions), and the Shampoo comparisons with the reference.
# Run from the repository root on the device with carry ["build/deps","build/data","build/refs"]:
# bash tools/probes/device_93.sh
set -u
export OMP_NUM_THREADS=16
nvidia-smi --query-gpu=name --format=csv,noheader
( time make -j16 ) > $OUT/build.txt 2>&1 || { tail -30 $OUT/build.txt; exit 1; }
tail -3 $OUT/build.txt
timeout 330 build/bin/tests -tc='GPU*' > $OUT/gpu_tests.txt 2>&1; echo "GPU tests rc $?"
grep -E 'ERROR|FAILED' $OUT/gpu_tests.txt | head -20; tail -3 $OUT/gpu_tests.txt
PYTHONUNBUFFERED=1 timeout 150 python3 tools/compare_optimizers.py --refs build/refs --device cuda --json $OUT/compare.json \
  --optimizers shampoo shampoo_momentum shampoo_options > $OUT/compare.txt 2>&1
echo "compare rc $?"; grep -E "qopt (cpu|cuda)" $OUT/compare.txt | cut -c1-200
