#!/bin/bash
# Stop 38: Distributed Shampoo's grafting methods (RMSprop, AdaGrad, SGD). Run from the repository
# root on the device with carry ["build/deps","build/data","build/refs"]: bash tools/probes/device_91.sh
source "$(dirname "$0")/device_common.sh"
device_build
timeout 200 build/bin/tests -tc='GPU Shampoo*,GPU optimizers*,GPU training*' > $OUT/gpu_tests.txt 2>&1
echo "GPU tests rc $?"; grep -E 'ERROR|FAILED' $OUT/gpu_tests.txt | head -20; tail -3 $OUT/gpu_tests.txt
PYTHONUNBUFFERED=1 timeout 200 python3 tools/compare_optimizers.py --refs build/refs --device cuda --json $OUT/compare.json \
  --optimizers shampoo shampoo_rmsprop shampoo_adagrad shampoo_sgd > $OUT/compare.txt 2>&1
echo "compare rc $?"; grep -E "qopt (cpu|cuda)" $OUT/compare.txt | cut -c1-250; grep -iE "error|Traceback" $OUT/compare.txt | head -5
