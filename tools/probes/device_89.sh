#!/bin/bash
# Stop 38: Distributed Shampoo's beta3, use_bias_correction, ClassicMomentumConfig.dampening and
# weight_decay_type as qopt flags. Run from the repository root on the device with carry
# ["build/deps","build/data","build/refs"]: bash tools/probes/device_89.sh
# It builds, runs the GPU optimizer cases (the new Shampoo variants among them) and compares the
# Shampoo settings with the reference on the CPU and the GPU.
source "$(dirname "$0")/device_common.sh"
device_build
timeout 200 build/bin/tests -tc='GPU Shampoo*,GPU optimizers*,GPU Newton*,GPU training*' > $OUT/gpu_tests.txt 2>&1
echo "GPU tests rc $?"; grep -E 'ERROR|FAILED' $OUT/gpu_tests.txt | head -20; tail -3 $OUT/gpu_tests.txt
PYTHONUNBUFFERED=1 timeout 200 python3 tools/compare_optimizers.py --refs build/refs --device cuda --json $OUT/compare.json \
  --optimizers shampoo shampoo_momentum shampoo_options shampoo_independent_decay > $OUT/compare.txt 2>&1
echo "compare rc $?"; grep -E "qopt (cpu|cuda)" $OUT/compare.txt | cut -c1-260; tail -3 $OUT/compare.txt | cut -c1-300
